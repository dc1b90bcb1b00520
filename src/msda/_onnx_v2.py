"""The v2 op (points per level, discrete sampling) in standard operators, for
``torch.onnx.export``: the decomposition :func:`msda.onnx.export_form_v2`
traces. Private; msda.onnx is the entry point.

Default method: v1's per-level bilinear decomposition (msda.onnx) on each
level's own points. Discrete method: one gather per point of the pixel
``trunc(loc * (W, H) + 0.5)`` clamped into the map, the index computed in
float32 (float64 for float64 locations) as the reference does; a NaN location
contributes zero (its weight is replaced, not multiplied).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import onnx as _onnx

__all__ = ["decomposed_ms_deform_attn_v2"]


def decomposed_ms_deform_attn_v2(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: Sequence[int],
    method: str = "default",
) -> torch.Tensor:
    """Same arguments and result as :func:`msda.ms_deform_attn_v2`, with standard operators only.

    The points per level and the method are fixed in the graph (they are
    Python values); batch, queries and image sizes are not.
    """
    rows, locations, weights, shapes, starts, layout = _onnx._prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    out = None
    first = 0
    for level, count in enumerate(points_per_level):
        if count == 0:
            continue
        level_locations = sampling_locations[:, :, :, first : first + count]
        level_weights = weights[:, :, :, first : first + count]
        if method == "discrete":
            part = _discrete_level(rows, level_locations, level_weights, shapes[level], starts[level], layout)
        else:
            part = _onnx._bilinear_level(
                rows, locations[:, :, :, first : first + count], level_weights, shapes[level], starts[level], layout
            )
        first += count
        out = part if out is None else out + part
    if out is None:
        # No points on any level: a sum of nothing, (N, Lq, M, 1, D) zeros with the traced sizes.
        out = torch.zeros_like(weights.sum(-1))[..., None, None] + torch.zeros_like(rows[:1])
    return out.reshape(N, Lq, M * D).to(value.dtype)


def _pixel_index(loc: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """trunc(loc * size + 0.5) clamped into [0, size - 1] (int64), and where loc is NaN.

    In the index dtype (float64 for float64 locations, else float32), multiply
    then add as two operations (the reference's rounding). Clamping before
    Floor equals the reference's trunc-then-clamp: both give 0 below 0 and
    size - 1 above it, and Floor is trunc on [0, size - 1]; ±inf clamp to the border.
    """
    index_dtype = torch.float64 if loc.dtype == torch.float64 else torch.float32
    v = loc.to(index_dtype) * size.to(index_dtype) + 0.5
    nan = torch.isnan(v)
    v = torch.where(nan, torch.zeros_like(v), v)
    v = torch.minimum(torch.maximum(v, torch.zeros_like(v)), (size - 1).to(index_dtype))
    return v.floor().to(torch.int64), nan


def _discrete_level(
    rows: torch.Tensor,
    locations: torch.Tensor,
    weights: torch.Tensor,
    shape: torch.Tensor,
    start: torch.Tensor,
    layout: "_onnx._Layout",
) -> torch.Tensor:
    """One level's nearest-pixel samples: locations (N, Lq, M, P, 2) in their own dtype,
    weights (N, Lq, M, P) in the compute dtype; the weighted sum (N, Lq, M, 1, D)."""
    h, w = shape[0], shape[1]
    x, x_nan = _pixel_index(locations[..., 0], w)
    y, y_nan = _pixel_index(locations[..., 1], h)
    weight = torch.where(x_nan | y_nan, torch.zeros_like(weights), weights)
    index = (layout.batch_row + start + (y * w + x).unsqueeze(-1)) * layout.M + layout.head  # (N, Lq, M, P, 1)
    return _onnx._gather_weighted(rows, index, weight.unsqueeze(-1))
