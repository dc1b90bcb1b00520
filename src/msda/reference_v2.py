"""Pure-PyTorch reference of the v2 op (RT-DETRv2, D-FINE, DEIM): the
ground truth the kernels are tested against and the fallback without the
compiled extension.

* ``method="default"``: one ``grid_sample`` per level on that level's own
  points, as :func:`msda.ms_deform_attn_reference` (which it calls, level by
  level, so both follow the same spec: non-finite and far locations
  contribute zero, 16-bit inputs are computed in float32).
* ``method="discrete"``: a gather of the single pixel
  ``trunc(loc * (W, H) + 0.5)`` clamped into the map, the index computed in
  float32 (float64 for float64 locations) with the product rounded before
  the addition; a NaN location contributes zero. Not ``grid_sample``'s
  nearest mode, whose half-pixel convention picks other pixels. Locations get
  no gradient (they pass through an integer index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_level_values
from .checks_v2 import check_inputs_v2
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn_v2_reference", "discrete_pixel_index"]


def discrete_pixel_index(loc: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel index along an axis of ``size`` pixels and a mask of NaN locations.

    trunc(loc * size + 0.5) in the index type (float64 for float64 locations,
    else float32: separate multiply and add ops, so nothing fuses them),
    clamped into [0, size - 1] in float64 before the integer conversion, so
    +-inf and huge values land on the border.
    """
    index_dtype = torch.float64 if loc.dtype == torch.float64 else torch.float32
    v = loc.detach().to(index_dtype) * size + 0.5
    nan = torch.isnan(v)
    index = torch.trunc(v.double()).nan_to_num(0.0).clamp(0, size - 1).long()
    return index, nan


def _discrete(value, shapes, starts, loc, weights, points, compute_dtype):
    N, _, M, D = value.shape
    Lq = loc.shape[1]
    v = value.to(compute_dtype)
    out = v.new_zeros(N, Lq, M, D)
    first = 0
    for (h, w), start, count in zip(shapes, starts, points):
        if count == 0:
            continue
        loc_l = loc[:, :, :, first : first + count]  # (N, Lq, M, P_l, 2)
        weights_l = weights[:, :, :, first : first + count].to(compute_dtype)  # (N, Lq, M, P_l)
        first += count
        x, x_nan = discrete_pixel_index(loc_l[..., 0], w)
        y, y_nan = discrete_pixel_index(loc_l[..., 1], h)
        rows = start + y * w + x  # (N, Lq, M, P_l)
        # value[n, rows, m, :] for every (n, q, m, p)
        n_index = torch.arange(N).view(N, 1, 1, 1)
        m_index = torch.arange(M).view(1, 1, M, 1)
        sampled = v[n_index, rows, m_index]  # (N, Lq, M, P_l, D)
        keep = ~(x_nan | y_nan)
        weights_l = torch.where(keep, weights_l, torch.zeros_like(weights_l))
        sampled = torch.where(keep.unsqueeze(-1), sampled, torch.zeros_like(sampled))
        out = out + (sampled * weights_l.unsqueeze(-1)).sum(3)
    return out.reshape(N, Lq, M * D)


def ms_deform_attn_v2_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: Sequence[int],
    method: str = "default",
) -> torch.Tensor:
    """The v2 op computed with ``grid_sample`` (default) or a gather (discrete).

    Same signature and semantics as :func:`msda.ms_deform_attn_v2`.
    """
    points = check_inputs_v2(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points_per_level, method
    )
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    check_level_values(spatial_shapes, level_start_index, S)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if method == "discrete":
        return _discrete(
            value, shapes, starts, sampling_locations, attention_weights, points, compute_dtype
        ).to(value.dtype)

    # Default: v1's reference on each level alone (one level, P_l points).
    out = None
    first = 0
    for level, count in enumerate(points):
        if count == 0:
            continue
        h, w = shapes[level]
        start = starts[level]
        value_l = value[:, start : start + h * w]
        part = ms_deform_attn_reference(
            value_l.to(compute_dtype),
            spatial_shapes[level : level + 1],
            torch.zeros_like(level_start_index[:1]),
            sampling_locations[:, :, :, first : first + count].unsqueeze(3).to(compute_dtype),
            attention_weights[:, :, :, first : first + count].unsqueeze(3).to(compute_dtype),
        )
        first += count
        out = part if out is None else out + part
    if out is None:  # no points at all: a sum of nothing, still connected to the graph
        out = (
            value.to(compute_dtype).sum() * 0
            + sampling_locations.to(compute_dtype).sum() * 0
            + attention_weights.to(compute_dtype).sum() * 0
        ).expand(N, Lq, M * D)
    return out.to(value.dtype).clone()
