"""The tiny example detector and test images shared by the exported-detector tests
(test_onnx_detector.py, test_aoti_detector.py)."""

from __future__ import annotations

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
