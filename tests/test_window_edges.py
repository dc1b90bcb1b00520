"""Points exactly on every edge of the sampling window, and just inside and
outside it, for the CPU kernels and both CUDA backward kernels (in the
emulation), forward and every gradient.

Spec §1: a point is sampled when -1 < x < W and -1 < y < H (pixel
coordinates, x = loc_x * W - 0.5); one exactly on that boundary contributes
zero value and has a zero location gradient (grid_sample's one-sided
gradient is not zero there). Widths and heights are powers of two so that every
location below maps to its pixel coordinate exactly (asserted).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import msda  # noqa: F401 (registers torch.ops.msda)
from cases import Case, assert_close_to_truth, float64_truth, level_tables

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
from build import load_emulation  # noqa: E402

SHAPES = [(4, 8), (2, 2), (1, 4)]  # (H, W), powers of two
STEP = 1 / 16


def offsets(size: int) -> list[float]:
    """Pixel coordinates along one axis: both edges, a step inside and outside each, and the middle."""
    return [-1 - STEP, -1.0, -1 + STEP, size / 2 - 0.25, size - STEP, float(size), size + STEP]


def window_case(D: int, dtype: torch.dtype) -> tuple[Case, torch.Tensor]:
    """Every (x, y) pair of offsets() on every level, one per query; and the
    mask of points exactly on an edge."""
    gen = torch.Generator().manual_seed(D)
    M, L = 2, len(SHAPES)
    Lq = len(offsets(1)) ** 2
    shapes, starts = level_tables(SHAPES)
    S = sum(h * w for h, w in SHAPES)
    loc = torch.empty(1, Lq, M, L, 1, 2, dtype=torch.float64)
    on_edge = torch.zeros(1, Lq, M, L, 1, dtype=torch.bool)
    for l, (H, W) in enumerate(SHAPES):
        pairs = [(x, y) for x in offsets(W) for y in offsets(H)]
        for q, (x, y) in enumerate(pairs):
            loc[0, q, :, l, 0] = torch.tensor([(x + 0.5) / W, (y + 0.5) / H])
            on_edge[0, q, :, l, 0] = x in (-1.0, W) or y in (-1.0, H)
    loc = loc.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wh = shapes.flip(-1).to(acc).view(1, 1, 1, L, 1, 2)
    pixel = loc.to(acc) * wh - 0.5
    assert torch.equal(pixel.double(), (loc.double() * wh.double() - 0.5)), "pixel coordinates must be exact"
    assert int(on_edge.sum()) == M * L * (4 * 7 - 4)  # 24 of the 49 points of each level and head
    case = Case(
        value=(torch.rand(1, S, M, D, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype),
        spatial_shapes=shapes,
        level_start_index=starts,
        sampling_locations=loc,
        attention_weights=(torch.rand(1, Lq, M, L, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype),
        grad_output=(torch.rand(1, Lq, M * D, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype),
    )
    return case, on_edge


@pytest.fixture(scope="module")
def emu():
    return load_emulation()


# (backend, D, dtype): the CPU kernels, and in the emulation the warp-segment
# backward kernel (D/VEC <= 32 groups) and the block kernel (> 32), each
# vectorised and scalar.
CONFIGS = [
    ("cpu", 4, torch.float32),
    ("cpu", 33, torch.float64),
    ("cuda-warp", 4, torch.float32),  # one float4 group
    ("cuda-warp", 3, torch.float64),  # scalar
    ("cuda-block", 132, torch.float32),  # 33 float4 groups
    ("cuda-block", 33, torch.float64),  # 33 scalar groups
]


@pytest.mark.parametrize("backend,D,dtype", CONFIGS, ids=[f"{b}-D{d}-{str(t)[6:]}" for b, d, t in CONFIGS])
def test_points_on_the_window_edges(emu, backend, D, dtype):
    case, on_edge = window_case(D, dtype)
    if backend == "cpu":
        out = torch.ops.msda.ms_deform_attn_forward(*case.inputs)
        grads = torch.ops.msda.ms_deform_attn_backward(*case.inputs, case.grad_output)
    else:
        out = emu.forward(*case.inputs)
        grads = emu.backward(*case.inputs, case.grad_output)
    want_out, (want_value, want_loc, want_attn) = float64_truth(case)
    assert_close_to_truth(out, want_out, name="output")
    assert_close_to_truth(grads[0], want_value, name="grad_value")
    assert_close_to_truth(grads[2], want_attn, name="grad_attention_weights")
    # On an edge: exactly zero (grid_sample's one-sided gradient is not; the
    # reference zeroes the weight of samples outside the open window).
    grad_loc = grads[1]
    edge = on_edge.unsqueeze(-1).expand_as(grad_loc)
    assert (grad_loc[edge] == 0).all(), f"location gradient on the edge: {grad_loc[edge].abs().max()}"
    assert (grads[2][on_edge] == 0).all(), "attention-weight gradient on the edge"
    assert_close_to_truth(grad_loc, want_loc, name="grad_sampling_locations")
