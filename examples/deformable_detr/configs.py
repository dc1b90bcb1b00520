"""Model configuration: one dataclass, one preset per published variant.

The defaults are the original R50 Deformable DETR (detector.md). ``tiny_config``
shrinks any variant to something that trains on a CPU in seconds, for tests and demos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DetrConfig", "VARIANTS", "STRUCTURE_FIELDS", "config_for_variant", "tiny_config"]


@dataclass
class DetrConfig:
    num_classes: int = 91
    # backbone
    backbone: str = "resnet50"  # "resnet18" / "resnet34" (BasicBlock) or "resnet50" (Bottleneck)
    backbone_width: int = 64  # channels of the stem; torchvision's ResNets use 64
    dilation: bool = False  # "DC5": dilate layer4 instead of striding it
    train_backbone: bool = True  # False freezes the whole backbone
    frozen_stem_and_layer1: bool = True  # the original freezes conv1/bn1/layer1
    # transformer
    num_feature_levels: int = 4  # 1 = single scale (layer4 only)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    input_proj_groups: int = 32  # GroupNorm groups after each input projection
    # detector
    with_box_refine: bool = False
    two_stage: bool = False  # needs with_box_refine, as in the original
    aux_loss: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"backbone must be resnet18, resnet34 or resnet50, got {self.backbone!r}")
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                "two_stage needs with_box_refine=True: the encoder proposals are scored by the extra "
                "per-layer head that box refinement creates (as in the original)"
            )
        if self.num_feature_levels not in (1,) and self.num_feature_levels < 3:
            raise ValueError(
                f"num_feature_levels must be 1 (single scale, layer4) or at least 3 (layer2-4 plus extra "
                f"strided levels), got {self.num_feature_levels}"
            )
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by nheads {self.nheads}")
        if self.hidden_dim % self.input_proj_groups:
            raise ValueError(
                f"hidden_dim {self.hidden_dim} must be divisible by input_proj_groups {self.input_proj_groups}"
            )

    def replace(self, **overrides: Any) -> "DetrConfig":
        return dataclasses.replace(self, **overrides)


# The published variants (detector.md, "Published results").
VARIANTS: dict[str, dict[str, Any]] = {
    "single_scale": dict(num_feature_levels=1),
    "single_scale_dc5": dict(num_feature_levels=1, dilation=True),
    "base": dict(),
    "box_refine": dict(with_box_refine=True),
    "two_stage": dict(with_box_refine=True, two_stage=True),
}

# The fields that make one variant differ from another (the rest are sizes).
STRUCTURE_FIELDS = frozenset(field for preset in VARIANTS.values() for field in preset)


def config_for_variant(name: str, **overrides: Any) -> DetrConfig:
    """The config of a published variant, with any field overridden."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return DetrConfig(**{**VARIANTS[name], **overrides})


def tiny_config(name: str = "base", **overrides: Any) -> DetrConfig:
    """A variant shrunk to a few hundred thousand parameters (CPU-trainable), structure unchanged."""
    small = dict(
        backbone="resnet18",
        backbone_width=8,
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=64,
        num_queries=10,
        enc_n_points=2,
        dec_n_points=2,
        input_proj_groups=8,
    )
    return config_for_variant(name, **{**small, **overrides})
