"""Random problems for the v2 op (points per level, both methods) and their
float64 ground truth, built on the v1 cases of tests/cases.py."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import msda
from cases import check_against, make_case, run_op

# Discrete-mode tests keep points this far (in pixels) from the .5 boundaries
# where trunc(loc * W + 0.5) changes: float32 and float64 index arithmetic
# may round such points to different pixels (issue 13's decision).
DISCRETE_MARGIN = 1e-3


@dataclasses.dataclass
class CaseV2:
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    grad_output: torch.Tensor
    points: list[int]
    method: str

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations, self.attention_weights)

    @property
    def args(self) -> tuple:
        return (*self.inputs, self.points, self.method)


def point_sizes(spatial_shapes: torch.Tensor, points: list[int]) -> torch.Tensor:
    """(W, H) of each point's level as float64, shaped (1, 1, 1, T, 2)."""
    levels = torch.repeat_interleave(torch.arange(len(points)), torch.tensor(points, dtype=torch.long))
    return spatial_shapes.flip(-1).double()[levels].view(1, 1, 1, -1, 2)


def off_discrete_boundaries(loc: torch.Tensor, spatial_shapes: torch.Tensor, points: list[int]) -> torch.Tensor:
    """Move points within DISCRETE_MARGIN px of a .5 boundary a quarter pixel away (in loc's dtype)."""
    wh = point_sizes(spatial_shapes, points)
    pixel = loc.double() * wh
    near = ((pixel - torch.floor(pixel)) - 0.5).abs() < DISCRETE_MARGIN
    moved = ((torch.floor(pixel) + 0.25) / wh).to(loc.dtype)
    loc = torch.where(near, moved, loc)
    pixel = loc.double() * wh
    assert bool((((pixel - torch.floor(pixel)) - 0.5).abs() >= DISCRETE_MARGIN).all())
    return loc


def make_case_v2(
    N: int,
    Lq: int,
    M: int,
    D: int,
    shapes: list[tuple[int, int]],
    points: list[int],
    method: str,
    seed: int,
    value_dtype: torch.dtype = torch.float64,
    loc_dtype: Optional[torch.dtype] = None,
    attn_dtype: Optional[torch.dtype] = None,
    index_dtype: torch.dtype = torch.int64,
) -> CaseV2:
    """A v1 case with max(points) points per level, cut to `points` per level."""
    base = make_case(
        N, Lq, M, D, shapes, max(max(points), 1), seed, value_dtype=value_dtype, loc_dtype=loc_dtype,
        attn_dtype=attn_dtype, index_dtype=index_dtype,
    )
    loc = torch.cat([base.sampling_locations[:, :, :, level, :count] for level, count in enumerate(points)], dim=3)
    attn = torch.cat([base.attention_weights[:, :, :, level, :count] for level, count in enumerate(points)], dim=3)
    if method == "discrete":
        loc = off_discrete_boundaries(loc, base.spatial_shapes, points)
    return CaseV2(
        base.value, base.spatial_shapes, base.level_start_index, loc.contiguous(), attn.contiguous(),
        base.grad_output, list(points), method,
    )


def float64_truth_v2(case: CaseV2):
    """Output and the three gradients in float64 through the reference."""
    value = case.value.detach().double().requires_grad_()
    loc = case.sampling_locations.detach().double().requires_grad_()
    attn = case.attention_weights.detach().double().requires_grad_()
    out = msda.ms_deform_attn_v2_reference(
        value, case.spatial_shapes, case.level_start_index, loc, attn, case.points, case.method
    )
    if out.numel() == 0:
        return out.detach(), (torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn))
    grads = torch.autograd.grad(out, (value, loc, attn), case.grad_output.double(), allow_unused=True)
    grads = tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (value, loc, attn)))
    return out.detach(), grads


def run_op_v2(op, case: CaseV2):
    """Forward and backward of `op` (msda.ms_deform_attn_v2 or a CUDA emulation wrapper) on a case."""
    return run_op(op, case, case.points, case.method)


def check_against_truth_v2(case: CaseV2, out: torch.Tensor, grads) -> None:
    """Compare with the float64 truth; discrete mode: the locations' gradient is exactly zero."""
    check_against(case, out, grads, *float64_truth_v2(case), zero_location_grad=case.method == "discrete")
