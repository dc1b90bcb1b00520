"""The demo's promises (README "Demo"): a fixed number of steps by default,
progress with the remaining time, closing lines with the step count and rate,
a checkpoint and the `predict` command that runs on it; `predict` names the
synthetic classes, keeps boxes inside the image and captions inside the picture."""

from __future__ import annotations

import json
import shlex

import pytest
from PIL import Image

from examples.deformable_detr import demo, predict, train
from examples.deformable_detr.api import Detector, build_variant
from examples.deformable_detr.checkpoint import CheckpointError
from examples.deformable_detr.data import SHAPES
from examples.deformable_detr.draw import draw_detections


def test_help_starts_with_the_program_name():
    assert demo.get_args_parser().format_help().startswith("usage: python -m examples.deformable_detr.demo")
    assert train.get_args_parser().format_help().startswith("usage: python -m examples.deformable_detr.train")


def test_default_is_a_fixed_number_of_steps():
    args = demo.get_args_parser().parse_args([])
    assert args.steps is None and args.seconds is None  # -> DEFAULT_STEPS, not a time budget
    assert demo.DEFAULT_STEPS > 0
    assert demo.get_args_parser().parse_args(["--seconds", "60"]).seconds == 60
    assert demo.get_args_parser().parse_args(["--train_seconds", "60"]).seconds == 60


def test_progress_line_estimates_the_remaining_time():
    assert demo.progress_line(300, 900, 100.0) == "demo: step 300/900 (33%), 3.00 steps/s, about 3 min 20 s left"
    assert demo.progress_line(900, 900, 300.0).endswith("about 0 s left")


def test_demo_saves_a_checkpoint_that_its_predict_command_runs_on(tmp_path, capsys):
    num_classes = 3
    results = demo.main(["--steps", "3", "--train_images", "16", "--val_images", "4", "--image_size", "64",
                         "--batch_size", "4", "--speed_steps", "0", "--output_dir", str(tmp_path / "demo"),
                         "--data_root", str(tmp_path / "data"), "--model", "hidden_dim=32",
                         "--model", "num_queries=10", "--num_classes", str(num_classes)])
    out = capsys.readouterr().out.strip().splitlines()
    assert "demo: step 3/3 (100%)" in "\n".join(out)
    assert out[-2].startswith("trained 3 steps in ") and "steps/s" in out[-2]
    assert out[-1].startswith("AP50 ")
    assert results["train_steps"] == 3 and results["steps_per_second"] > 0

    command = next(line for line in out if line.strip().startswith("python -m examples.deformable_detr.predict"))
    argv = shlex.split(command)[3:] + ["--threshold", "0"]  # an untrained model: keep every detection
    assert predict.main(argv) == 0
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "demo" / "detections").glob("*.json"))]
    assert len(records) == 4
    names = {d["name"] for r in records for d in r["detections"]}
    assert names & set(SHAPES[:num_classes]) and names <= {*SHAPES[:num_classes], "background"}, names
    for r in records:
        for d in r["detections"]:
            x0, y0, x1, y1 = d["box_xyxy"]
            assert 0 <= x0 <= x1 <= r["width"] and 0 <= y0 <= y1 <= r["height"], d

    # the API reads what the checkpoint records: its sizes, image size rule and class names
    checkpoint = results["checkpoint"]
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    assert (detector.short_side, detector.max_size) == (64, round(1333 * 64 / 800))
    assert detector.class_names == ["background", *SHAPES[:num_classes]]
    assert build_variant(results["variant"], checkpoint).config == detector.model.config
    other = "two_stage" if results["variant"] != "two_stage" else "base"
    with pytest.raises(CheckpointError) as info:
        build_variant(other, checkpoint)
    message = str(info.value)
    assert f"the checkpoint is variant {results['variant']!r}, the model is {other!r}" in message
    assert len(message) < 1500 and " more" in message, message


def test_captions_stay_inside_the_picture():
    image = Image.new("RGB", (64, 48), "white")
    colour = (230, 25, 75)  # the palette's colour of label 0
    drawn = draw_detections(image, [[50.0, 30.0, 90.0, 60.0]], [0], [0.93], ["ellipse"], line_width=1)
    # The caption "ellipse 0.93" is wider than the 14 pixels right of x0 = 50 and the box
    # crosses the bottom: it moves left and up into the picture.
    pixels = drawn.load()
    caption_pixels = [(x, y) for x in range(0, 50) for y in range(48) if pixels[x, y] == colour]
    assert caption_pixels, "caption not shifted into the picture"
