"""The inference command and the programmatic API, on generated images and a tiny checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from examples.deformable_detr import predict
from examples.deformable_detr.api import Detector, build_variant, preprocess, resized_size
from examples.deformable_detr.checkpoint import CheckpointError, save_checkpoint
from examples.deformable_detr.coco_names import COCO_NAMES
from examples.deformable_detr.configs import tiny_config
from examples.deformable_detr.deformable_detr import build_model
from examples.deformable_detr.draw import draw_detections


SMALL = ["--short-side", "96"]  # the tiny model needs no 800-pixel images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_config("box_refine"))
    # give the heads some input dependence, so detections differ between images
    with torch.no_grad():
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, model)
    return str(path)


def make_image(path, size=(96, 72), seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return str(path)


def test_command_writes_png_and_json(tmp_path, checkpoint, capsys):
    image = make_image(tmp_path / "street.jpg")
    out = tmp_path / "out"
    code = predict.main([checkpoint, image, "--output-dir", str(out), "--threshold", "0.01", "--device", "cpu", *SMALL])
    assert code == 0
    record = json.loads((out / "street.json").read_text())
    assert record["width"] == 96 and record["height"] == 72 and record["image"] == image
    dets = record["detections"]
    assert 0 < len(dets) <= 100
    assert all(d["score"] >= 0.01 and d["name"] == COCO_NAMES[d["label"]] for d in dets)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    drawn = Image.open(out / "street.png")
    assert drawn.size == (96, 72)
    original = np.asarray(Image.open(image).convert("RGB"))
    assert (np.asarray(drawn) != original).any()  # something was drawn
    assert "street.jpg: " in capsys.readouterr().out

    # the JSON holds what the API predicts
    [api] = Detector.from_checkpoint(checkpoint, short_side=96).predict(Image.open(image), threshold=0.01)
    assert len(api["scores"]) == len(dets)
    np.testing.assert_allclose([d["box_xyxy"] for d in dets], api["boxes"].numpy(), atol=2e-3)


def test_folder_and_batches_give_the_same_detections(tmp_path, checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        make_image(folder / f"img{i}.png", seed=i)
    (folder / "notes.txt").write_text("not an image")
    one, two = tmp_path / "one", tmp_path / "two"
    assert predict.main([checkpoint, str(folder), "--output-dir", str(one), "--threshold", "0.05", *SMALL]) == 0
    assert predict.main([checkpoint, str(folder), "--output-dir", str(two), "--threshold", "0.05", "--batch-size", "2", *SMALL]) == 0
    assert sorted(os.listdir(one)) == [f"img{i}.{ext}" for i in range(3) for ext in ("json", "png")]
    for i in range(3):
        a = json.loads((one / f"img{i}.json").read_text())["detections"]
        b = json.loads((two / f"img{i}.json").read_text())["detections"]
        assert [d["label"] for d in a] == [d["label"] for d in b]
        np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-5)


def test_padding_in_a_batch_of_different_sizes_does_not_change_the_result(checkpoint):
    detector = Detector.from_checkpoint(checkpoint, short_side=96)
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    large = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    [alone] = detector.predict([small], threshold=0.0)
    together = detector.predict([small, large], threshold=0.0)
    assert len(together) == 2
    # the mask keeps padding out of attention: scores agree closely (the backbone's convolutions
    # see the zero padding at the border, so not bit for bit)
    torch.testing.assert_close(together[0]["scores"][:10], alone["scores"][:10], atol=0.05, rtol=0)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, ck: ["/nonexistent/ck.pth", str(d / "a.png")], "checkpoint file not found: /nonexistent/ck.pth"),
        (lambda d, ck: [ck, str(d / "missing.png")], "image file or folder not found"),
        (lambda d, ck: [ck, str(d / "broken.png")], "cannot read image"),
        (lambda d, ck: [ck, str(d / "a.png"), "--variant", "two_stage"], "is a checkpoint of variant 'box_refine', not 'two_stage'"),
        (lambda d, ck: [ck, str(d / "empty")], "no image files"),
        *(
            [(lambda d, ck: [ck, str(d / "a.png"), "--device", "cuda"], "CUDA is not available")]
            if not torch.cuda.is_available()
            else []
        ),
    ],
)
def test_clear_errors(tmp_path, checkpoint, capsys, make_args, message):
    make_image(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "empty").mkdir()
    code = predict.main(make_args(tmp_path, checkpoint) + ["--output-dir", str(tmp_path / "out"), *SMALL])
    assert code == 2
    assert message in capsys.readouterr().err


def test_api_accepts_pil_and_tensors(checkpoint):
    detector = Detector.from_checkpoint(checkpoint, variant="box_refine", short_side=96)
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    [from_pil] = detector.predict(pil, threshold=0.0)
    [from_tensor] = detector.predict(tensor, threshold=0.0)
    [from_uint8] = detector.predict(torch.from_numpy(array).permute(2, 0, 1), threshold=0.0)
    assert from_pil["boxes"].shape == (100, 4) and len(from_pil["names"]) == 100
    # PIL and torch resize differently in the last bits; the detections agree closely
    torch.testing.assert_close(from_tensor["scores"][:5], from_pil["scores"][:5], atol=0.02, rtol=0)
    torch.testing.assert_close(from_uint8["scores"], from_tensor["scores"])
    assert (from_pil["boxes"][:, 0::2] >= -1).all() and (from_pil["boxes"][:, 0::2] <= 91).all()


def test_build_variant_and_load(checkpoint):
    # the sizes come from the checkpoint: no need to repeat the tiny config
    model = build_variant("box_refine", checkpoint)
    assert model.config == tiny_config("box_refine")
    assert build_variant("box_refine", checkpoint, dropout=0.0).config.dropout == 0.0  # overrides still apply
    for other in ("base", "two_stage"):
        with pytest.raises(CheckpointError) as info:
            build_variant(other, checkpoint)
        message = str(info.value)
        assert f"the checkpoint is variant 'box_refine', the model is '{other}'" in message
        # a few keys and a count, not every name in the state_dict
        assert len(message) < 1500 and " more" in message, message


def test_from_checkpoint_uses_the_recorded_size_and_names(tmp_path):
    model = build_model(tiny_config("base", num_classes=3))
    path = tmp_path / "demo_like.pth"
    save_checkpoint(path, model, args={**vars(model.config), "class_names": ["background", "circle", "square"],
                                       "short_side": 128, "max_size": 213})
    detector = Detector.from_checkpoint(path, device="cpu")
    assert (detector.short_side, detector.max_size) == (128, 213)
    assert detector.class_names == ["background", "circle", "square"]
    # keywords override what is recorded; None keeps it
    other = Detector.from_checkpoint(path, device="cpu", short_side=96, max_size=None, class_names=["a", "b", "c"])
    assert (other.short_side, other.max_size, other.class_names) == (96, 213, ["a", "b", "c"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8))
    [result] = detector.predict(image, threshold=0.0)
    assert set(result["names"]) <= {"background", "circle", "square"}


def test_api_snippet_runs_as_written(tmp_path):
    """The example's README snippet, on the CPU and with the image opened as shown."""
    model = build_model(tiny_config("base"))
    save_checkpoint(tmp_path / "checkpoint.pth", model)
    make_image(tmp_path / "street.jpg", size=(120, 90))
    detector = Detector.from_checkpoint(str(tmp_path / "checkpoint.pth"), device="cpu")
    [result] = detector.predict(Image.open(str(tmp_path / "street.jpg")), threshold=0.0)
    assert {"boxes", "scores", "labels", "names"} <= set(result)
    assert result["boxes"].shape[1] == 4 and len(result["names"]) == len(result["scores"])


def test_resize_rule_and_padding():
    assert resized_size(480, 640) == (800, 1066)
    assert resized_size(500, 2000) == (333, 1332)  # capped by the long side (rounded as the original)
    assert resized_size(800, 600) == (1066, 800)
    assert resized_size(800, 1000) == (800, 1000)  # already there
    batch, mask, sizes = preprocess([torch.rand(3, 40, 60), torch.rand(3, 60, 40)], resize=False)
    assert batch.shape == (2, 3, 60, 60) and sizes.tolist() == [[40, 60], [60, 40]]
    assert mask[0, 40:].all() and not mask[0, :40].any() and mask[1, :, 40:].all()
    assert (batch[0, :, 40:] == 0).all()


def test_draw_detections_draws_inside_the_boxes():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    drawn = draw_detections(image, torch.tensor([[10.0, 30.0, 60.0, 70.0]]), torch.tensor([1]),
                            torch.tensor([0.93]), COCO_NAMES, line_width=2)
    pixels = np.asarray(drawn)
    assert drawn.size == image.size and (pixels[50, 10] != 255).any()  # left edge of the box
    assert (pixels[50, 35] == 255).all()  # inside stays untouched
    assert (pixels[5, 90] == 255).all()  # far away too
    assert image.getpixel((10, 50)) == (255, 255, 255)  # the input is not modified


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_gives_close_detections(checkpoint, dtype):
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    [full] = Detector.from_checkpoint(checkpoint, short_side=96).predict(image, threshold=0.0)
    [low] = Detector.from_checkpoint(checkpoint, short_side=96, autocast=dtype).predict(image, threshold=0.0)
    assert low["scores"].dtype == torch.float32 and torch.isfinite(low["boxes"]).all()
    torch.testing.assert_close(low["scores"][:10], full["scores"][:10], atol=0.02, rtol=0)


def test_autocast_choice_is_checked(checkpoint):
    with pytest.raises(ValueError, match="autocast must be"):
        Detector.from_checkpoint(checkpoint, autocast="float8")
