"""Detect objects with a Deformable DETR checkpoint and draw them.

    python -m examples.deformable_detr.predict CHECKPOINT IMAGE_OR_FOLDER [...] --output-dir detections

For every image, writes <output-dir>/<name>.png (boxes, labels and scores drawn) and
<output-dir>/<name>.json (the detections; boxes clipped to the image). Works with the original
repository's checkpoints (the variant is read from the weights), with ours, and with the files
that examples.deformable_detr.export writes (.onnx runs in onnxruntime, .pt2 as an AOTInductor
package). A checkpoint or exported file that records its class names and image size (the demo's)
is used with them unless the options say otherwise.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (README "OMP_WAIT_POLICY"); it
# takes effect when this module is the program, before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import warnings
from typing import Optional, Sequence

import torch

from .api import AUTOCAST_DTYPES, Detector
from .checkpoint import CheckpointError
from .configs import VARIANTS
from .draw import draw_detections
from .export import BACKENDS, SUFFIXES, exported_detector
from .optional import needs_extra

with needs_extra():
    from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PredictError(Exception):
    """A user error: reported as one line, exit status 2."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.deformable_detr.predict", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint file (.pth, original Deformable DETR format) or exported file "
                   "(.onnx, .pt2) from examples.deformable_detr.export")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--output-dir", default="detections", help="where to write the PNGs and JSONs (default: %(default)s)")
    p.add_argument("--variant", choices=sorted(VARIANTS), help="expected variant; default: read from the checkpoint")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep a detection (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass, padded with masks (default: %(default)s)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="run the model under autocast (for CUDA)")
    p.add_argument("--short-side", type=int, default=None,
                   help="resize the short side to this (default: the size the checkpoint or exported file "
                   "records, else 800)")
    p.add_argument("--max-size", type=int, default=None,
                   help="cap on the long side after resizing (default: the recorded one, else 1333)")
    p.add_argument("--class-names", help="text file with one class name per line (label index = line number); "
                   "default: the recorded names, else COCO's")
    p.add_argument(
        "--backend", choices=("torch", *BACKENDS), default=None,
        help="torch: CHECKPOINT is a PyTorch checkpoint; onnxruntime/aoti: a file from examples.deformable_detr.export "
        "(default: from the name: .onnx onnxruntime, .pt2 aoti, anything else torch)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def collect_images(paths: Sequence[str]) -> list[str]:
    """Expand folders into their image files (sorted, not recursive); every path must exist."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise PredictError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise PredictError(f"image file or folder not found: {path}")
    return files


def open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise PredictError(f"cannot read image {path}: {exc}") from exc


def output_stems(files: Sequence[str]) -> list[str]:
    """File names without extension, made unique (a.jpg and a.png -> a, a_1)."""
    stems, used = [], set()
    for f in files:
        base = stem = os.path.splitext(os.path.basename(f))[0]
        n = 0
        while stem in used:
            n += 1
            stem = f"{base}_{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def choose_backend(path: str, backend: Optional[str]) -> str:
    """The --backend given, else the one of the file's suffix (.onnx, .pt2), else torch."""
    return backend or SUFFIXES.get(os.path.splitext(path)[1].lower(), "torch")


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """xyxy boxes clipped to the image: the model may place a box edge past the border."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def run(args: argparse.Namespace) -> list[str]:
    """Predict and write every image; returns the written JSON paths."""
    if not os.path.isfile(args.checkpoint):
        raise PredictError(f"checkpoint file not found: {args.checkpoint}")
    files = collect_images(args.images)
    class_names = None
    if args.class_names:
        if not os.path.isfile(args.class_names):
            raise PredictError(f"class names file not found: {args.class_names}")
        with open(args.class_names, encoding="utf-8") as f:
            class_names = [line.strip() for line in f]
    backend = choose_backend(args.checkpoint, args.backend)
    # None: what the checkpoint or exported file records (else the defaults)
    options = dict(variant=args.variant, device=args.device, autocast=args.autocast,
                   short_side=args.short_side, max_size=args.max_size, class_names=class_names)
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            if backend == "torch":
                detector = Detector.from_checkpoint(args.checkpoint, **options)
            else:
                detector = exported_detector(args.checkpoint, backend, **options)
    except CheckpointError as exc:
        hint = ""
        if backend == "torch" and "cannot read checkpoint" in str(exc):
            hint = (" (if it is an exported file, name its backend: --backend onnxruntime for ONNX, "
                    "--backend aoti for an AOTInductor package)")
        raise PredictError(f"{exc}{hint}") from exc
    except ValueError as exc:  # wrong variant, unusable device, ...
        raise PredictError(str(exc)) from exc
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    stems = output_stems(files)
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = [open_image(f) for f in chunk]
        results = detector.predict(images, threshold=args.threshold)
        for path, stem, image, result in zip(chunk, stems[start:], images, results):
            result["boxes"] = clip_boxes(result["boxes"], image.width, image.height)
            drawn = draw_detections(image, result["boxes"], result["labels"], result["scores"], detector.class_names)
            drawn.save(os.path.join(args.output_dir, f"{stem}.png"))
            record = {
                "image": path,
                "width": image.width,
                "height": image.height,
                "detections": [
                    {"label": int(l), "name": n, "score": round(float(s), 6), "box_xyxy": [round(float(v), 3) for v in b]}
                    for l, n, s, b in zip(result["labels"], result["names"], result["scores"], result["boxes"])
                ],
            }
            json_path = os.path.join(args.output_dir, f"{stem}.json")
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            written.append(json_path)
            print(f"{path}: {len(record['detections'])} detections -> {json_path}")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
