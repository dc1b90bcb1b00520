"""``MSDeformAttnFunction``: the calling convention of the original
Deformable DETR code and of mmcv's ``MultiScaleDeformableAttnFunction``, so old
code switches by changing an import."""

from __future__ import annotations

import torch

from .ops import ms_deform_attn

__all__ = ["MSDeformAttnFunction"]


class MSDeformAttnFunction:
    """Drop-in for the original ``MSDeformAttnFunction``.

    Only ``apply`` is provided; it is differentiable through
    :func:`msda.ms_deform_attn`'s registered autograd formula.
    """

    @staticmethod
    def apply(
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int = 64,
    ) -> torch.Tensor:
        """Same arguments as the original. ``im2col_step`` is accepted for
        compatibility and has no effect: any batch size works."""
        del im2col_step
        return ms_deform_attn(
            value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights
        )
