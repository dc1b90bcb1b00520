"""The tiny example detector and test images shared by the exported-detector tests
(test_onnx_detector.py, test_aoti_detector.py)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from PIL import Image

from examples.deformable_detr.checkpoint import save_checkpoint
from examples.deformable_detr.configs import tiny_config
from examples.deformable_detr.deformable_detr import DeformableDETR, build_model


# What the demo's checkpoints record besides the weights (demo.py, --image_size 128): the class
# names and the image size trained at. Predictions from a checkpoint and from its exports use them.
CLASS_NAMES = ["background", "circle", "square", "triangle"]
DEMO_SETTINGS = {"class_names": CLASS_NAMES, "short_side": 128, "max_size": 213}


def tiny_detector(directory) -> tuple[DeformableDETR, str]:
    """The tiny detector (weights moved off their initialisation) and its checkpoint in ``directory``,
    recording the demo's settings (DEMO_SETTINGS)."""
    torch.manual_seed(0)
    model = build_model(tiny_config("base", enc_layers=1, dec_layers=1, num_classes=len(CLASS_NAMES))).eval()
    with torch.no_grad():  # move off the initialisation so boxes and classes differ between queries
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint = str(directory / "tiny.pth")
    save_checkpoint(checkpoint, model, args={**vars(model.config), **DEMO_SETTINGS})
    return model, checkpoint


def images(seed: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(120, 90), (70, 130)]  # (width, height): different aspect ratios, so the batch is padded
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy())
        for w, h in sizes
    ]


# The predict command's threshold for the tiny detector's test images (the size: the recorded one).
PREDICT_ARGS = ["--threshold", "0.0"]


def saved_images(directory: pathlib.Path, seed: int) -> list[str]:
    """images(seed) saved as PNG files in ``directory``; their paths."""
    paths = []
    for i, image in enumerate(images(seed)):
        paths.append(str(directory / f"img{i}.png"))
        image.save(paths[-1])
    return paths


def assert_same_detections(got_dir: pathlib.Path, want_dir: pathlib.Path, count: int, atol: float) -> None:
    """The predict command's JSON for images img0..img{count-1}: as many detections, scores within
    atol, and, for each detection whose score is clearly apart from its neighbours' (near-ties may
    swap ranks), the same label and name and the same box within 0.01 pixel."""
    for i in range(count):
        got = json.loads((got_dir / f"img{i}.json").read_text())["detections"]
        want = json.loads((want_dir / f"img{i}.json").read_text())["detections"]
        assert len(got) == len(want) > 0
        scores = [d["score"] for d in want]
        assert [d["score"] for d in got] == pytest.approx(scores, abs=atol)
        gaps = [b - a for a, b in zip(scores[1:], scores[:-1])]
        apart = [all(gap > 10 * atol for gap in gaps[max(0, k - 1) : k + 1]) for k in range(len(scores))]
        assert any(apart)
        for g, w, keep in zip(got, want, apart):
            if keep:
                assert (g["label"], g["name"]) == (w["label"], w["name"])
                assert g["box_xyxy"] == pytest.approx(w["box_xyxy"], abs=1e-2)
