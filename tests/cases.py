"""Random problems for the op and a float64 ground truth to compare with.

Shared by the CPU kernel tests and the CUDA emulation tests. Locations are
drawn the way the op meets them and the way bugs hide: mostly inside the map,
some outside [0, 1], some exactly on pixel centres (where floor() changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch

import msda

@dataclasses.dataclass
class Case:
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    grad_output: torch.Tensor

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations, self.attention_weights)

    @property
    def max_hw(self) -> int:
        return int(self.spatial_shapes.max()) if self.spatial_shapes.numel() else 1


def level_tables(shapes: list[tuple[int, int]], index_dtype: torch.dtype = torch.int64):
    spatial_shapes = torch.tensor(shapes, dtype=index_dtype).reshape(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]).to(index_dtype)
    return spatial_shapes, level_start_index


def make_case(
    N: int,
    Lq: int,
    M: int,
    D: int,
    shapes: list[tuple[int, int]],
    P: int,
    seed: int,
    value_dtype: torch.dtype = torch.float64,
    loc_dtype: Optional[torch.dtype] = None,
    attn_dtype: Optional[torch.dtype] = None,
    outside_fraction: float = 0.15,
    on_grid_fraction: float = 0.1,
    index_dtype: torch.dtype = torch.int64,
) -> Case:
    """A random problem; tensors are generated in float64 then rounded to their dtypes."""
    gen = torch.Generator().manual_seed(seed)
    L = len(shapes)
    spatial_shapes, level_start_index = level_tables(shapes, index_dtype)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    value = torch.rand(N, S, M, D, generator=gen, dtype=torch.float64) * 2 - 1
    loc = torch.rand(N, Lq, M, L, P, 2, generator=gen, dtype=torch.float64)
    # Some locations well outside the map (-0.5..1.5 covers both sides).
    outside = torch.rand(N, Lq, M, L, P, 2, generator=gen, dtype=torch.float64) < outside_fraction
    loc = torch.where(outside, loc * 2 - 0.5, loc)
    # Some just beside pixel centres inside the map: x = k +- 1/64, i.e.
    # loc = (k + 0.5 +- 1/64) / W, where floor() must pick the right cell. Not
    # exactly on them: the bilinear function has a kink there, and which one-sided
    # location gradient a float64 rounding of grid_sample's own arithmetic picks
    # is an accident. (tests/test_edge_cases.py samples exact centres forward.)
    wh = spatial_shapes.flip(-1).to(torch.float64).view(1, 1, 1, L, 1, 2)
    nudge = torch.where(torch.rand(loc.shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64) / 64
    cells = torch.minimum(torch.floor(loc * wh).clamp_min(0), wh - 1)
    centres = (cells + 0.5 + nudge) / wh
    on_grid = torch.rand(N, Lq, M, L, P, 1, generator=gen, dtype=torch.float64) < on_grid_fraction
    loc = torch.where(on_grid, centres, loc)
    attn = torch.rand(N, Lq, M, L, P, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum(dim=(-1, -2), keepdim=True).clamp_min(1e-12)
    grad_output = torch.rand(N, Lq, M * D, generator=gen, dtype=torch.float64) * 2 - 1
    loc = loc.to(loc_dtype or value_dtype)
    # Rounding (to loc's dtype, or the kernels' float32 arithmetic: 0.9f * 5
    # is 4.5 exactly) can also put a coordinate on or within a hair of a
    # pixel centre, the bilinear function's kink: there float64 and float32
    # take different one-sided location gradients. Move those a quarter pixel.
    pixel = loc.double() * wh - 0.5
    kink = pixel.round()
    loc = torch.where((pixel - kink).abs() < 1e-4, ((kink + 0.75) / wh).to(loc.dtype), loc)
    # Rounding to a 16-bit dtype can put a location exactly on the sampling
    # window's edge (x = -1 or x = W), where spec §1 lets grid_sample's one-sided
    # gradient differ from the kernels' zero: move those few into the map.
    pixel = loc.double() * wh - 0.5
    on_edge = ((pixel == -1) | (pixel == wh)).any(-1, keepdim=True)
    loc = torch.where(on_edge, torch.full_like(loc, 0.5), loc)
    return Case(
        value.to(value_dtype),
        spatial_shapes,
        level_start_index,
        loc,
        attn.to(attn_dtype or value_dtype),
        grad_output.to(value_dtype),
    )


def float64_truth(case: Case) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Output and (grad_value, grad_locations, grad_weights) in float64, from the
    very same (rounded) inputs, through the grid_sample reference."""
    value = case.value.detach().double().requires_grad_()
    loc = case.sampling_locations.detach().double().requires_grad_()
    attn = case.attention_weights.detach().double().requires_grad_()
    out = msda.ms_deform_attn_reference(value, case.spatial_shapes, case.level_start_index, loc, attn)
    if out.numel() == 0:
        return out.detach(), (torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn))
    grads = torch.autograd.grad(out, (value, loc, attn), case.grad_output.double())
    return out.detach(), grads


RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}


def assert_close_to_truth(got: torch.Tensor, want: torch.Tensor, *, name: str) -> None:
    """|got - want| <= atol + rtol * |want|, with atol = rtol * max|want|.

    The kernels accumulate in float32 (float64 for float64) and round once to
    the output dtype, so for float16/bfloat16 the error is the final rounding:
    rtol is twice the unit roundoff (2**-11, 2**-8). That is tighter than the
    spec's "unit roundoff times the number of terms", and so it also catches a
    kernel that accumulates in 16 bits. float32 uses the spec's 1e-5. Scaling
    atol by the tensor's largest magnitude scales the location gradient by
    the map size, as the spec asks.
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    rtol = RTOL[got.dtype]
    scale = float(want.abs().max()) if want.numel() else 0.0
    atol = rtol * max(scale, 1e-6)
    got64 = got.detach().double()
    assert bool(torch.isfinite(got64).all()), f"{name}: non-finite values"
    err = (got64 - want).abs()
    bound = atol + rtol * want.abs()
    if err.numel() and not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name} ({got.dtype}): |got - want| = {err.flatten()[i].item():.3e} > "
            f"{bound.flatten()[i].item():.3e} at flat index {i} (got {got64.flatten()[i].item():.6e}, "
            f"want {want.flatten()[i].item():.6e}; atol {atol:.2e}, rtol {rtol:.2e}); "
            f"{int((err > bound).sum())} of {err.numel()} elements out of tolerance"
        )


def check_against_truth(case: Case, out: torch.Tensor, grads: tuple[torch.Tensor, ...]) -> None:
    """Compare an op's output and gradients with the float64 truth."""
    check_against(case, out, grads, *float64_truth(case))


def check_against(case, out, grads, want_out, want_grads, zero_location_grad: bool = False) -> None:
    """Compare an op's output and gradients on a case (v1 or v2) with the
    given truth, and their dtypes with the inputs'; zero_location_grad: the
    locations' gradient must be exactly zero instead (v2's discrete mode)."""
    assert out.dtype == case.value.dtype, f"output has dtype {out.dtype}, expected {case.value.dtype}"
    assert_close_to_truth(out, want_out, name="output")
    names = ("grad_value", "grad_sampling_locations", "grad_attention_weights")
    inputs = (case.value, case.sampling_locations, case.attention_weights)
    for got, want, inp, name in zip(grads, want_grads, inputs, names):
        assert got.dtype == inp.dtype, f"{name} has dtype {got.dtype}, expected that of its input, {inp.dtype}"
        if zero_location_grad and name == "grad_sampling_locations":
            assert bool((got == 0).all()), "the locations must get a zero gradient"
            continue
        assert_close_to_truth(got, want, name=name)


def run_op(op, case, *extra_args) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Forward and backward of `op` (e.g. msda.ms_deform_attn) on a case
    (v1 or v2), extra_args passed after the five tensors."""
    value = case.value.detach().clone().requires_grad_()
    loc = case.sampling_locations.detach().clone().requires_grad_()
    attn = case.attention_weights.detach().clone().requires_grad_()
    out = op(value, case.spatial_shapes, case.level_start_index, loc, attn, *extra_args)
    if out.numel() == 0:
        out.sum().backward()
    else:
        out.backward(case.grad_output)
    grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (value, loc, attn))
    return out.detach(), grads


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False) -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) for the block, off again after it
    (also when it raises: the next test must not run deterministic)."""
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
