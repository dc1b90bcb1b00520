"""COCO-format detection datasets and padded batching.

``CocoDetection`` reads an image folder and an instances JSON (COCO itself or
the synthetic set) and returns ``(image tensor, target)`` after the transforms.
``collate_fn`` pads a batch to its largest image and returns the mask of the
padding (True where padded), which the model needs to ignore it.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Callable, Optional

import torch

from ..optional import needs_extra

with needs_extra():
    from PIL import Image
    from pycocotools.coco import COCO

__all__ = ["CocoDetection", "collate_fn", "pad_images", "coco_paths"]


class CocoDetection(torch.utils.data.Dataset):
    """Images of ``img_folder`` with the annotations of ``ann_file``.

    Crowd annotations are dropped and boxes clipped to the image, as in the
    original; the target carries ``image_id`` and ``orig_size`` so predictions
    can be mapped back for COCO evaluation.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms: Optional[Callable] = None) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(ann_file)
        self.img_folder = img_folder
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        """The untransformed image and its target (boxes absolute xyxy)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = Image.open(os.path.join(self.img_folder, info["file_name"])).convert("RGB")
        width, height = image.size
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32)[keep],
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64)[keep],
            "image_id": torch.tensor([image_id]),
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
        }
        return image, target

    def __getitem__(self, index: int):
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (3, H_i, W_i) images into (B, 3, H, W), zero-padded at the bottom
    and right, and a (B, H, W) bool mask, True at padding."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for image, padded, m in zip(images, batch, mask):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        m[: image.shape[1], : image.shape[2]] = False
    return batch, mask


def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """(images (B, 3, H, W), mask (B, H, W) True at padding, list of targets)."""
    images, targets = zip(*batch)
    padded, mask = pad_images(list(images))
    return padded, mask, list(targets)


def coco_paths(root: str, image_set: str) -> tuple[str, str]:
    """(image folder, annotation file) for a split laid out as COCO is:
    ``root/<split>2017/`` and ``root/annotations/instances_<split>2017.json``,
    or without the year (the synthetic set)."""
    for name in (f"{image_set}2017", image_set):
        folder = os.path.join(root, name)
        ann_file = os.path.join(root, "annotations", f"instances_{name}.json")
        if os.path.isdir(folder) and os.path.exists(ann_file):
            return folder, ann_file
    raise FileNotFoundError(
        f"no {image_set!r} split under {root!r}: expected {root}/{image_set}2017/ and "
        f"{root}/annotations/instances_{image_set}2017.json (or the same without 2017)"
    )
