"""Pure-PyTorch multi-scale deformable attention, built on ``grid_sample``.

This is the ground truth the kernels are tested against and the fallback used
when the compiled extension is unavailable. It follows the whole contract of
the op (documentation: "The op and the module"), not only the happy path of the original code:

* non-finite or far-away locations are first moved to a place that is outside
  every map, so they contribute zero and receive zero gradient (grid_sample
  would return NaN, and huge coordinates overflow its integer arithmetic);
* a sample outside the window -1 < x < W, -1 < y < H (pixel coordinates)
  contributes nothing whatever its attention weight, NaN and inf included,
  as in the original CUDA kernel (which skips such samples): the weight is
  replaced by zero there, where grid_sample's zero times a NaN weight would
  give NaN;
* float16/bfloat16 inputs are computed in float32 and cast back, because
  grid_sample in 16-bit on the CPU is inaccurate and crashes on some inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_inputs, check_level_values

__all__ = ["ms_deform_attn_reference"]

# Any normalised coordinate in [-1, 2] that lies outside [0, 1] is also outside
# the sampling window (-1 < x < W) for every W >= 1, so clamping to this range
# leaves all in-map samples untouched and keeps out-of-map ones out of the map
# (with zero gradient, since clamp and nan_to_num pass no gradient there).
_OUTSIDE_LOW = -1.0
_OUTSIDE_HIGH = 2.0


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention computed with ``grid_sample``.

    Same signature and semantics as :func:`msda.ms_deform_attn`.

    Args:
        value: (N, S, M, D) flattened feature maps of all levels.
        spatial_shapes: (L, 2) integer tensor of (H_l, W_l).
        level_start_index: (L,) integer tensor, start row of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) locations.
        attention_weights: (N, Lq, M, L, P) weights, used as given.

    Returns:
        (N, Lq, M*D) tensor in the dtype of ``value``.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    check_level_values(spatial_shapes, level_start_index, S)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]

    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    v = value.to(compute_dtype)
    loc = sampling_locations.to(compute_dtype)
    weights = attention_weights.to(compute_dtype)
    if N * Lq * M * D * P == 0:
        # Nothing is sampled: zeros (grid_sample rejects empty batches). The
        # empty slices keep the autograd graph connected with zero gradients;
        # `t.sum() * 0` would not, since a NaN anywhere in t makes it NaN.
        connected = v.reshape(-1)[:0].sum() + loc.reshape(-1)[:0].sum() + weights.reshape(-1)[:0].sum()
        return (v.new_zeros(N, Lq, M * D) + connected).to(value.dtype)

    # Pixel coordinates, computed as the kernels do (in the compute dtype); a
    # sample is taken only inside the open window (False for NaN).
    wh = spatial_shapes.flip(-1).to(device=loc.device, dtype=compute_dtype).view(1, 1, 1, L, 1, 2)
    pixel = loc.detach() * wh - 0.5
    taken = ((pixel > -1) & (pixel < wh)).all(-1)
    weights = torch.where(taken, weights, torch.zeros((), dtype=compute_dtype, device=weights.device))

    loc = torch.nan_to_num(loc, nan=_OUTSIDE_LOW, posinf=_OUTSIDE_HIGH, neginf=_OUTSIDE_LOW)
    loc = loc.clamp(_OUTSIDE_LOW, _OUTSIDE_HIGH)
    grids = 2 * loc - 1  # grid_sample's [-1, 1] convention (align_corners=False)

    sampled_levels = []
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = v[:, start : start + h * w].permute(0, 2, 3, 1).reshape(N * M, D, h, w).contiguous()
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled_levels.append(sampled)  # (N*M, D, Lq, P)
    sampled = torch.stack(sampled_levels, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (sampled * weights).sum(-1)  # (N*M, D, Lq)
    out = out.view(N, M * D, Lq).transpose(1, 2).contiguous()
    return out.to(value.dtype)
