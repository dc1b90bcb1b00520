"""Programmatic inference: build a detector by variant name, load weights, predict on images.

    from examples.deformable_detr.api import Detector
    detector = Detector.from_checkpoint("r50_deformable_detr-checkpoint.pth", device="cpu")
    [result] = detector.predict(PIL.Image.open("street.jpg"), threshold=0.5)
    result["boxes"], result["labels"], result["scores"], result["names"]
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (
    CheckpointError,
    checkpoint_fields,
    config_from_checkpoint,
    infer_variant,
    load_weights,
    read_checkpoint,
    state_dict_of,
)
from .coco_names import COCO_NAMES
from .configs import STRUCTURE_FIELDS, config_for_variant
from .deformable_detr import DeformableDETR, build_model
from .inference_settings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InferenceSettings,
    default_class_names,
    settings_from_args,
)
from .optional import needs_extra
from .postprocess import PostProcess

with needs_extra():
    from PIL import Image

__all__ = ["Detector", "build_variant", "preprocess", "resized_size"]

ImageLike = Union[Image.Image, torch.Tensor]
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def build_variant(variant: str, checkpoint: Optional[str | os.PathLike] = None, **overrides: Any) -> DeformableDETR:
    """A model of a published variant (configs.VARIANTS), with weights from ``checkpoint`` if given.

    With a checkpoint, the sizes (layers, widths, queries, classes, backbone) are the checkpoint's,
    read from its weights and saved settings; ``overrides`` change any field. A checkpoint of
    another variant raises CheckpointError naming the variant its weights belong to."""
    if checkpoint is None:
        return build_model(config_for_variant(variant, **overrides))
    ckpt = read_checkpoint(checkpoint)
    fields = checkpoint_fields(ckpt)
    if variant != infer_variant(state_dict_of(ckpt), ckpt.get("args")):
        # the variant asked for decides the structure (load_weights then names the checkpoint's)
        fields = {k: v for k, v in fields.items() if k not in STRUCTURE_FIELDS}
    model = build_model(config_for_variant(variant, **{**fields, **overrides}))
    load_weights(model, ckpt, source=os.fspath(checkpoint))
    return model


def resized_size(height: int, width: int, short_side: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """(h, w) after the evaluation resize: short side to ``short_side`` unless the long side would
    pass ``max_size`` (then the long side is capped), as the original evaluation transform."""
    size = short_side
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _to_float_chw(image: ImageLike) -> torch.Tensor:
    """PIL image, or (3, H, W) tensor (float in [0, 1] or uint8), -> float (3, H, W) in [0, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W), got shape {tuple(image.shape)}")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    raise TypeError(f"expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


def preprocess(
    images: Sequence[ImageLike],
    short_side: int = 800,
    max_size: int = 1333,
    resize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize (as the original evaluation), normalise per channel (ImageNet statistics by default)
    and pad into a batch.

    Returns:
        (batch (B, 3, H, W), mask (B, H, W) True at padding, original sizes (B, 2) as (h, w)).
    """
    tensors, sizes = [], []
    for image in images:
        if isinstance(image, Image.Image):
            sizes.append((image.height, image.width))
            if resize:
                h, w = resized_size(image.height, image.width, short_side, max_size)
                image = image.convert("RGB").resize((w, h), Image.BILINEAR)
            x = _to_float_chw(image)
        else:
            x = _to_float_chw(image)
            sizes.append(tuple(x.shape[-2:]))
            if resize:
                h, w = resized_size(x.shape[1], x.shape[2], short_side, max_size)
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        tensors.append((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    batch = torch.zeros(len(tensors), 3, height, width)
    mask = torch.ones(len(tensors), height, width, dtype=torch.bool)
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = False
    return batch, mask, torch.tensor(sizes, dtype=torch.long)


class Detector:
    """A detector ready for inference: model in eval mode on a device, preprocessing, post-processing.

    Args:
        model: a DeformableDETR (weights loaded).
        class_names: label index -> name; COCO's 91 by default.
        device: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when available).
        autocast: None, "float16" or "bfloat16": run the model under torch.autocast.
        short_side, max_size: the evaluation resize (800 and 1333 as the original).
        mean, std: per-channel normalisation of RGB values in [0, 1] (ImageNet's by default).
    """

    def __init__(
        self,
        model: DeformableDETR,
        class_names: Optional[Sequence[str]] = None,
        device: str = "cpu",
        autocast: Optional[str] = None,
        short_side: int = 800,
        max_size: int = 1333,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.short_side, self.max_size = short_side, max_size
        self.mean, self.std = tuple(mean), tuple(std)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested, but CUDA is not available here (use --device cpu)")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, 'float16' or 'bfloat16', got {autocast!r}")
        self.autocast = autocast
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names) if class_names is not None else list(COCO_NAMES)
        self.postprocess = PostProcess()

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, variant: Optional[str] = None, **kwargs: Any
    ) -> "Detector":
        """Build the model a checkpoint needs and load it (strictly).

        ``variant``, when given, must be the checkpoint's: otherwise a CheckpointError names both.
        The image size rule, normalisation and class names are those the checkpoint records (the
        demo's checkpoints do), else the original's (800/1333, ImageNet statistics, COCO names);
        the keywords of ``Detector`` override them (None keeps the checkpoint's).
        """
        ckpt = read_checkpoint(path)
        found = infer_variant(state_dict_of(ckpt), ckpt.get("args"))
        if variant is not None and variant != found:
            dc5_unknown = {variant, found} == {"single_scale", "single_scale_dc5"}
            if not dc5_unknown:
                raise CheckpointError(
                    f"{os.fspath(path)} is a checkpoint of variant {found!r}, not {variant!r}"
                )
            found = variant  # DC5 leaves no trace in the weights: trust the caller
        config = config_from_checkpoint(ckpt, dilation=found == "single_scale_dc5")
        model = build_model(config)
        load_weights(model, ckpt, source=os.fspath(path))
        return cls.with_settings(model, settings_from_args(ckpt.get("args")), config.num_classes, **kwargs)

    @classmethod
    def with_settings(
        cls, model: Any, settings: InferenceSettings, num_classes: int, **kwargs: Any
    ) -> "Detector":
        """A Detector with ``settings``' preprocessing and class names, unless ``kwargs`` set them."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        for name in ("short_side", "max_size", "mean", "std"):
            kwargs.setdefault(name, getattr(settings, name))
        kwargs["class_names"] = default_class_names(num_classes, kwargs.get("class_names", settings.class_names))
        return cls(model, **kwargs)

    @classmethod
    def from_exported(cls, path: str | os.PathLike, backend: Optional[str] = None, **kwargs: Any) -> "Detector":
        """A Detector around a file written by ``examples.deformable_detr.export``: ``.onnx`` runs in
        onnxruntime, ``.pt2`` (AOTInductor) in this process; ``backend`` ("onnxruntime" or "aoti")
        for other names. Preprocessing and class names are the ones the file records."""
        from .export import exported_detector  # export imports this module

        return exported_detector(os.fspath(path), backend, **kwargs)

    def _autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    @torch.no_grad()
    def predict(
        self,
        images: Union[ImageLike, Sequence[ImageLike]],
        threshold: float = 0.5,
        resize: bool = True,
    ) -> list[dict[str, Any]]:
        """Detect objects in one image or a list (processed as one padded batch).

        Images are PIL images or (3, H, W) RGB tensors in [0, 1] (or uint8). Returns per image
        {"boxes" (K, 4) xyxy pixels of the input image, "scores" (K,), "labels" (K,), "names"},
        the top-100 (query, class) pairs with score >= threshold, best first, on the CPU.
        """
        single = isinstance(images, (Image.Image, torch.Tensor))
        batch_list = [images] if single else list(images)
        if not batch_list:
            return []
        batch, mask, sizes = preprocess(
            batch_list, self.short_side, self.max_size, resize=resize, mean=self.mean, std=self.std
        )
        with self._autocast_context():
            outputs = self.model(batch.to(self.device), mask.to(self.device))
        results = self.postprocess(outputs, sizes.to(self.device))
        out = []
        for r in results:
            keep = r["scores"] >= threshold
            labels = r["labels"][keep].cpu()
            out.append(
                {
                    "boxes": r["boxes"][keep].float().cpu(),
                    "scores": r["scores"][keep].float().cpu(),
                    "labels": labels,
                    "names": [self.class_names[i] if i < len(self.class_names) else str(i) for i in labels.tolist()],
                }
            )
        return out
