"""The original Deformable DETR augmentations, on a PIL image and its target.

A target is a dict with ``boxes`` (K, 4) absolute xyxy, ``labels`` (K,),
``area`` (K,), ``iscrowd`` (K,), ``image_id``, ``orig_size`` and ``size``
(both (h, w)). Geometric transforms keep the boxes in step with the image;
``Normalize`` finally turns them into (cx, cy, w, h) normalised by the image
size, which is what the model predicts. Randomness comes from Python's
``random`` module, seeded by the training script. Only PIL and torch are
needed (no torchvision).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..inference_settings import IMAGENET_MEAN, IMAGENET_STD
from ..optional import needs_extra

with needs_extra():
    from PIL import Image

__all__ = [
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSizeCrop",
    "RandomSelect",
    "ToTensor",
    "Normalize",
    "make_coco_transforms",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

Target = dict[str, Any]


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int) -> tuple[Image.Image, Target]:
    """Crop to the region; boxes are shifted and clipped, emptied ones dropped."""
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    target["boxes"] = boxes.reshape(-1, 4)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    for field in ("boxes", "labels", "area", "iscrowd"):
        target[field] = target[field][keep]
    return image, target


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    width = image.width
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    return image, target


def resized_shape(width: int, height: int, size: int, max_size: Optional[int]) -> tuple[int, int]:
    """(width, height) with the short side ``size``, shrunk so the long side stays <= ``max_size``."""
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(image: Image.Image, target: Target, size: int, max_size: Optional[int]) -> tuple[Image.Image, Target]:
    new_w, new_h = resized_shape(image.width, image.height, size, max_size)
    ratio_w, ratio_h = new_w / image.width, new_h / image.height
    image = image.resize((new_w, new_h), Image.BILINEAR)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image, target):
        return hflip(image, target) if random.random() < self.p else (image, target)


class RandomResize:
    """Resize the short side to one of ``sizes``, the long side at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None) -> None:
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region with sides in [min_size, max_size] (capped by the image)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        width = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top = random.randint(0, image.height - height)
        left = random.randint(0, image.width - width)
        return crop(image, target, top, left, height, width)


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if random.random() < self.p else self.second(image, target)


class ToTensor:
    def __call__(self, image, target):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), target


class Normalize:
    """ImageNet normalisation; boxes become (cx, cy, w, h) divided by the image size."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: torch.Tensor, target):
        image = (image - self.mean) / self.std
        target = dict(target)
        height, width = image.shape[-2:]
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        target["boxes"] = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, target


def make_coco_transforms(image_set: str, scale: float = 1.0, augment: str = "original") -> Compose:
    """The original transforms, with every size multiplied by ``scale``.

    ``scale=1`` gives the COCO recipe (train: flip, then either a short side in
    480..800 step 32 or a resize to 400/500/600, a 384..600 crop and the
    multi-scale resize; long side <= 1333; val: short side 800). Smaller
    images (the synthetic set) use a smaller ``scale``. ``augment`` chooses
    ``"original"``, ``"flip_resize"`` (no crops) or ``"none"`` (eval resize only).
    """
    if augment not in ("original", "flip_resize", "none"):
        raise ValueError(f"augment must be 'original', 'flip_resize' or 'none', got {augment!r}")

    def s(size: float) -> int:
        return max(1, int(round(size * scale)))

    normalize = Compose([ToTensor(), Normalize()])
    scales = sorted({s(480 + 32 * i) for i in range(11)})
    max_size = s(1333)
    if image_set == "train" and augment == "original":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    RandomResize([s(400), s(500), s(600)]),
                    RandomSizeCrop(s(384), s(600)),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "train" and augment == "flip_resize":
        return Compose([RandomHorizontalFlip(), RandomResize(scales, max_size=max_size), normalize])
    if image_set in ("train", "val", "test"):
        return Compose([RandomResize([s(800)], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}")
