"""What inference needs besides the weights: the resize rule, the normalisation, the class names
and the variant.

A checkpoint records them in its ``args`` (the demo's checkpoints: ``class_names``, ``short_side``,
``max_size``); ``export`` copies them into the exported file as string metadata (ONNX
``metadata_props``, the AOTInductor package's metadata), so that the exported file is
preprocessed and labelled as its checkpoint, with nothing to pass by hand.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .coco_names import COCO_NAMES

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InferenceSettings",
    "settings_from_args",
    "default_class_names",
    "to_metadata",
    "from_metadata",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Metadata keys are these field names with this prefix (the AOTInductor package has keys of its own).
PREFIX = "detector."
_JSON_FIELDS = ("mean", "std", "class_names")


@dataclass(frozen=True)
class InferenceSettings:
    """Preprocessing and labels of one model; the defaults are the original COCO evaluation's.

    ``class_names``: label index -> name, or None when the model does not record them
    (default_class_names then gives COCO's for 91 classes, else the indices)."""

    short_side: int = 800
    max_size: int = 1333
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: Optional[tuple[str, ...]] = None
    variant: Optional[str] = None


def settings_from_args(args: Any, variant: Optional[str] = None) -> InferenceSettings:
    """The settings a checkpoint's ``args`` (Namespace, dict or None) records; defaults for the rest."""
    saved = vars(args) if args is not None and not isinstance(args, Mapping) else dict(args or {})
    fields: dict[str, Any] = {}
    for name in ("short_side", "max_size"):
        if saved.get(name) is not None:
            fields[name] = int(saved[name])
    for name in ("mean", "std", "class_names"):
        if saved.get(name) is not None:
            fields[name] = tuple(saved[name])
    return InferenceSettings(**fields, variant=variant)


def default_class_names(num_classes: int, names: Optional[Sequence[str]] = None) -> list[str]:
    """``names`` if given; COCO's for a 91-class model; otherwise the label indices as text."""
    if names is not None:
        return list(names)
    return list(COCO_NAMES) if num_classes == len(COCO_NAMES) else [str(i) for i in range(num_classes)]


def to_metadata(settings: InferenceSettings) -> dict[str, str]:
    """String key/value pairs (what ONNX and AOTInductor metadata hold); None fields are left out."""
    out = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is not None:
            out[PREFIX + field.name] = json.dumps(list(value)) if field.name in _JSON_FIELDS else str(value)
    return out


def from_metadata(metadata: Mapping[str, str]) -> Optional[InferenceSettings]:
    """The settings stored by to_metadata, or None when the file has none (exported before they
    were recorded). Missing optional fields take their defaults."""
    if PREFIX + "short_side" not in metadata:
        return None
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(InferenceSettings):
        text = metadata.get(PREFIX + field.name)
        if text is None:
            continue
        if field.name in _JSON_FIELDS:
            fields[field.name] = tuple(json.loads(text))
        elif field.name in ("short_side", "max_size"):
            fields[field.name] = int(text)
        else:
            fields[field.name] = text
    return InferenceSettings(**fields)
