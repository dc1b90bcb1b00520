"""A built-in synthetic detection dataset, written in COCO format.

Images of simple filled shapes (one class per shape kind) in random sizes and
colours, some overlapping, on varied backgrounds (flat, gradient, noise,
stripes). Every image is generated from its own seed derived from
``(seed, split, index)``, so a split is the same whatever its length and on
every machine. The files are written once and reused while the spec matches
(the spec is stored next to them), so everything runs without COCO.

Layout under ``root`` (the same as COCO's, so ``build_dataset`` reads both)::

    root/<split>/000000.png ...
    root/annotations/instances_<split>.json
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..optional import needs_extra

with needs_extra():
    from PIL import Image, ImageDraw

__all__ = ["SHAPES", "SyntheticSpec", "generate_image", "write_synthetic_split", "ensure_synthetic_dataset"]

# Each shape fills its bounding box tightly, so the box annotation is exact.
SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross")


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic split looks like.

    ``image_size`` is the nominal side; with ``size_jitter`` > 0 width and
    height vary independently by up to that fraction (batches then need
    padding). Object sides are fractions of the shorter image side.
    """

    num_classes: int = 3
    image_size: int = 128
    size_jitter: float = 0.0
    min_objects: int = 1
    max_objects: int = 3
    min_scale: float = 0.2
    max_scale: float = 0.6
    # A new object may overlap earlier ones, but cover at most this fraction of
    # any of them, so that every annotated object stays visible.
    max_covered: float = 0.4
    seed: int = 42

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {self.num_classes}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")


def _image_rng(spec: SyntheticSpec, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{spec.seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) float array in [0, 255]: flat, gradient, noise or stripes."""
    kind = rng.integers(4)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    if kind == 0:
        return np.broadcast_to(c0, (height, width, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return c0 + (c1 - c0) * t[..., None]
    if kind == 2:
        # smooth noise: a coarse random grid upsampled bilinearly
        coarse = rng.uniform(0, 1, size=(4, 4, 1)).astype(np.float32)
        grid = Image.fromarray((coarse[..., 0] * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
        t = np.asarray(grid, dtype=np.float32)[..., None] / 255.0
        return c0 + (c1 - c0) * t
    period = int(rng.integers(6, 20))
    ys, xs = np.mgrid[0:height, 0:width]
    stripes = ((xs + ys * rng.integers(0, 2)) // period) % 2
    return np.where(stripes[..., None] == 1, c0, c0 * 0.7 + c1 * 0.3)


def _contrasting_colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background to be seen."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background_mean) > 120:
            break
    else:
        colour = 255 - background_mean
    return tuple(int(c) for c in colour)  # type: ignore[return-value]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple, flip: bool) -> float:
    """Draw a filled shape touching all four sides of ``box``; return its area."""
    x0, y0, x1, y1 = box  # inclusive pixel corners
    w, h = x1 - x0 + 1, y1 - y0 + 1
    if shape == "rectangle":
        draw.rectangle(box, fill=colour)
        return float(w * h)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
        return math.pi / 4 * w * h
    if shape == "triangle":
        apex, base = (y1, y0) if flip else (y0, y1)
        draw.polygon([((x0 + x1) / 2, apex), (x0, base), (x1, base)], fill=colour)
        return w * h / 2
    if shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
        return w * h / 2
    if shape == "cross":
        tw, th = max(w // 3, 1), max(h // 3, 1)
        cx0, cy0 = x0 + (w - tw) // 2, y0 + (h - th) // 2
        draw.rectangle((cx0, y0, cx0 + tw - 1, y1), fill=colour)
        draw.rectangle((x0, cy0, x1, cy0 + th - 1), fill=colour)
        return float(tw * h + th * w - tw * th)
    raise ValueError(f"unknown shape {shape!r}")


def _covered_fraction(new: tuple[int, int, int, int], old: tuple[int, int, int, int]) -> float:
    ix = max(0, min(new[2], old[2]) - max(new[0], old[0]) + 1)
    iy = max(0, min(new[3], old[3]) - max(new[1], old[1]) + 1)
    return ix * iy / ((old[2] - old[0] + 1) * (old[3] - old[1] + 1))


def generate_image(spec: SyntheticSpec, split: str, index: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its objects: dicts with ``category_id`` (1-based), ``bbox`` (x, y, w, h), ``area``."""
    rng = _image_rng(spec, split, index)
    jitter = rng.uniform(1 - spec.size_jitter, 1 + spec.size_jitter, size=2) if spec.size_jitter > 0 else (1, 1)
    width, height = (max(16, int(round(spec.image_size * j))) for j in jitter)
    pixels = _background(rng, width, height)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    background_mean = pixels.reshape(-1, 3).mean(0)

    side = min(width, height)
    objects: list[dict[str, Any]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        for _attempt in range(20):
            w = int(side * rng.uniform(spec.min_scale, spec.max_scale))
            h = int(w * rng.uniform(0.6, 1.6))
            w, h = max(4, min(w, width)), max(4, min(h, height))
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w - 1, y0 + h - 1)
            if all(_covered_fraction(box, old) <= spec.max_covered for old in boxes):
                break
        else:
            continue  # no room left for another visible object
        category = int(rng.integers(spec.num_classes))
        colour = _contrasting_colour(rng, background_mean)
        area = _draw_shape(draw, SHAPES[category], box, colour, flip=bool(rng.integers(2)))
        boxes.append(box)
        objects.append({"category_id": category + 1, "bbox": [float(x0), float(y0), float(w), float(h)], "area": area})
    return image, objects


def write_synthetic_split(root: str, split: str, num_images: int, spec: SyntheticSpec) -> str:
    """Write ``num_images`` images and their COCO json; return the json path."""
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = generate_image(spec, split, index)
        file_name = f"{index:06d}.png"
        image.save(os.path.join(image_dir, file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    coco = {
        "info": {"description": "msda synthetic shapes", "spec": asdict(spec), "split": split, "num_images": num_images},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": SHAPES[i], "supercategory": "shape"} for i in range(spec.num_classes)
        ],
    }
    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    tmp = ann_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(coco, f)
    os.replace(tmp, ann_file)  # the json appears last and whole: it marks a finished split
    return ann_file


def ensure_synthetic_dataset(root: str, splits: dict[str, int], spec: SyntheticSpec) -> dict[str, str]:
    """Make sure each split exists with this spec and size (writing it if not).

    Returns ``{split: ann_file}``.
    """
    ann_files = {}
    for split, num_images in splits.items():
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        current = None
        if os.path.exists(ann_file):
            with open(ann_file) as f:
                info = json.load(f).get("info", {})
            current = (info.get("spec"), info.get("num_images"))
        if current != (asdict(spec), num_images):
            write_synthetic_split(root, split, num_images, spec)
        ann_files[split] = ann_file
    return ann_files
