"""Datasets for the Deformable DETR example: COCO-format folders and the
built-in synthetic shapes (the default, so nothing needs downloading)."""

from __future__ import annotations

from typing import Optional

from .coco import CocoDetection, coco_paths, collate_fn, pad_images
from .synthetic import SHAPES, SyntheticSpec, ensure_synthetic_dataset
from .transforms import make_coco_transforms

__all__ = [
    "CocoDetection",
    "collate_fn",
    "pad_images",
    "coco_paths",
    "SHAPES",
    "SyntheticSpec",
    "ensure_synthetic_dataset",
    "make_coco_transforms",
    "build_dataset",
]


def build_dataset(
    image_set: str,
    root: str,
    scale: float = 1.0,
    augment: str = "original",
    transforms_image_set: Optional[str] = None,
) -> CocoDetection:
    """A COCO-format split under ``root`` with the original transforms at ``scale``.

    ``transforms_image_set`` overrides which transforms are used (for example
    eval transforms on the training images).
    """
    folder, ann_file = coco_paths(root, image_set)
    transforms = make_coco_transforms(transforms_image_set or image_set, scale=scale, augment=augment)
    return CocoDetection(folder, ann_file, transforms)
