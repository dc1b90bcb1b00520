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


def tiny_detector(directory) -> tuple[DeformableDETR, str]:
    """The tiny detector (weights moved off their initialisation) and its checkpoint in ``directory``."""
    torch.manual_seed(0)
    model = build_model(tiny_config("base", enc_layers=1, dec_layers=1)).eval()
    with torch.no_grad():  # move off the initialisation so boxes and classes differ between queries
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint = str(directory / "tiny.pth")
    save_checkpoint(checkpoint, model)
    return model, checkpoint


def images(seed: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(120, 90), (70, 130)]  # (width, height): different aspect ratios, so the batch is padded
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy())
        for w, h in sizes
    ]


# The predict command's size and threshold for the tiny detector's test images.
PREDICT_ARGS = ["--short-side", "96", "--max-size", "160", "--threshold", "0.0"]


def saved_images(directory: pathlib.Path, seed: int) -> list[str]:
    """images(seed) saved as PNG files in ``directory``; their paths."""
    paths = []
    for i, image in enumerate(images(seed)):
        paths.append(str(directory / f"img{i}.png"))
        image.save(paths[-1])
    return paths


def assert_same_detections(got_dir: pathlib.Path, want_dir: pathlib.Path, count: int, atol: float) -> None:
    """The predict command's JSON for images img0..img{count-1}: as many detections, scores within atol."""
    for i in range(count):
        got = json.loads((got_dir / f"img{i}.json").read_text())["detections"]
        want = json.loads((want_dir / f"img{i}.json").read_text())["detections"]
        assert len(got) == len(want) > 0
        assert [d["score"] for d in got] == pytest.approx([d["score"] for d in want], abs=atol)
