"""Property-based fuzzing of every entry point (hypothesis, bounded).

Random problems, zero sizes included, in every dtype combination, with
special values (NaN, ±inf and ±1e30 locations; NaN weights anywhere; NaN and
±inf weights on points outside the map), and, in part of the cases, one
deliberate mistake: a wrong level table, shape, dtype or device. The
property: every entry point (the public function with its autograd, the raw
CPU ops, the reference, the CUDA kernels run by the CPU emulation, the fake
kernels on meta tensors) either
raises an error that names the argument, or returns results equal to the
float64 computation, NaN equal to NaN at the same positions. Never garbage,
never a crash (the sanitizer CI job, .ci/sanitize.sh, runs this file too).

MSDA_FUZZ_EXAMPLES sets the number of examples per test (default 150).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msda
from cases import RTOL, Case, float64_truth, make_case, run_op
from emulation import emulation
from test_op_vs_reference import DTYPE_COMBINATIONS

EXAMPLES = int(os.environ.get("MSDA_FUZZ_EXAMPLES", "150"))
OPS = torch.ops.msda
SPECIAL_LOCATIONS = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]
OUTSIDE_WEIGHTS = [float("nan"), float("inf"), float("-inf")]


@st.composite
def problems(draw) -> dict:
    L = draw(st.integers(1, 3))
    return dict(
        N=draw(st.integers(0, 2)),
        Lq=draw(st.integers(0, 5)),
        M=draw(st.integers(0, 3)),
        D=draw(st.sampled_from([0, 1, 3, 8, 17])),
        shapes=[(draw(st.integers(1, 5)), draw(st.integers(1, 5))) for _ in range(L)],
        P=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


def with_special_values(case: Case, seed: int) -> Case:
    """Special locations (each on a point then moved outside the map) with
    non-finite weights on some of them, and NaN weights at random points."""
    gen = torch.Generator().manual_seed(seed)
    loc = case.sampling_locations.clone()
    attn = case.attention_weights.clone()
    if attn.numel() == 0:
        return case
    points = attn.shape
    special = torch.rand(points, generator=gen) < 0.2
    kind = torch.randint(len(SPECIAL_LOCATIONS), points, generator=gen)
    axis = torch.randint(2, points, generator=gen)
    for k, bad in enumerate(SPECIAL_LOCATIONS):
        for a in range(2):
            loc[..., a][special & (kind == k) & (axis == a)] = bad
    outside_weight = special & (torch.rand(points, generator=gen) < 0.5)
    wkind = torch.randint(len(OUTSIDE_WEIGHTS), points, generator=gen)
    for k, bad in enumerate(OUTSIDE_WEIGHTS):
        attn[outside_weight & (wkind == k)] = bad
    attn[torch.rand(points, generator=gen) < 0.05] = float("nan")
    return Case(case.value, case.spatial_shapes, case.level_start_index, loc, attn, case.grad_output)


# One deliberate mistake: (name, the argument the error must name, change).
# `values` marks mistakes in the level tables' values, which only the checks
# that read them catch (the CPU kernels, the public function, the reference);
# on the GPU the kernels skip such levels instead, so the emulation is not asked.
def _inputs(case: Case) -> dict:
    return dict(value=case.value, spatial_shapes=case.spatial_shapes, level_start_index=case.level_start_index,
                sampling_locations=case.sampling_locations, attention_weights=case.attention_weights,
                grad_output=case.grad_output)


def _grown(t: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] += 1
    return t.new_zeros(shape)


def _scaled_shapes(case: Case, factor: int) -> dict:
    shapes = case.spatial_shapes.clone()
    shapes[-1, 0] *= factor
    return dict(spatial_shapes=shapes)


MISTAKES: dict[str, tuple[str, bool, Callable[[Case], dict]]] = {
    "level too large": ("spatial_shapes", True, lambda c: _scaled_shapes(c, 2)),
    "empty level": ("spatial_shapes", True, lambda c: _scaled_shapes(c, 0)),
    "negative level": ("spatial_shapes", True, lambda c: _scaled_shapes(c, -1)),
    "overflowing level": ("spatial_shapes", True, lambda c: dict(
        spatial_shapes=torch.full_like(c.spatial_shapes, 2**31 - 1 if c.spatial_shapes.dtype == torch.int32 else 2**32))),
    "wrong start": ("level_start_index", True, lambda c: dict(level_start_index=c.level_start_index + 1)),
    "shapes float": ("spatial_shapes", False, lambda c: dict(spatial_shapes=c.spatial_shapes.double())),
    "shapes rank": ("spatial_shapes", False, lambda c: dict(spatial_shapes=c.spatial_shapes.flatten())),
    "no levels": ("spatial_shapes", False, lambda c: dict(
        spatial_shapes=c.spatial_shapes[:0], level_start_index=c.level_start_index[:0],
        sampling_locations=c.sampling_locations[:, :, :, :0], attention_weights=c.attention_weights[:, :, :, :0])),
    "starts length": ("level_start_index", False, lambda c: dict(level_start_index=c.level_start_index[:0])),
    "value integer": ("value", False, lambda c: dict(value=c.value.to(torch.int32))),
    "value rank": ("value", False, lambda c: dict(value=c.value.flatten(2))),
    "locations dtype": ("sampling_locations", False, lambda c: dict(
        sampling_locations=c.sampling_locations.to(torch.float64 if c.value.dtype != torch.float64 else torch.float16))),
    "locations last dim": ("sampling_locations", False, lambda c: dict(sampling_locations=c.sampling_locations[..., :1])),
    "weights P": ("attention_weights", False, lambda c: dict(attention_weights=_grown(c.attention_weights, 4))),
    "locations M": ("sampling_locations", False, lambda c: dict(sampling_locations=_grown(c.sampling_locations, 2))),
    "weights dtype": ("attention_weights", False, lambda c: dict(attention_weights=c.attention_weights.to(torch.int64))),
    "weights N": ("attention_weights", False, lambda c: dict(attention_weights=_grown(c.attention_weights, 0))),
    "weights on meta": ("attention_weights", False, lambda c: dict(attention_weights=c.attention_weights.to("meta"))),
    "value on meta": ("value", False, lambda c: dict(value=c.value.to("meta"))),
    "grad_output shape": ("grad_output", False, lambda c: dict(grad_output=_grown(c.grad_output, 2))),
    "grad_output on meta": ("grad_output", False, lambda c: dict(grad_output=c.grad_output.to("meta"))),
}


def _raw_forward(args: dict):
    return OPS.ms_deform_attn_forward(*list(args.values())[:5])


def _raw_backward(args: dict):
    return OPS.ms_deform_attn_backward(*args.values())


def _public(args: dict):
    return msda.ms_deform_attn(*list(args.values())[:5])


def _reference(args: dict):
    return msda.ms_deform_attn_reference(*list(args.values())[:5])


def _emulated_forward(args: dict):
    return emulation().forward(*list(args.values())[:5])


def _emulated_backward(args: dict):
    return emulation().backward(*args.values())


def assert_error_names(entry: Callable[[dict], object], args: dict, argument: str) -> None:
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        entry(args)
    assert argument in str(info.value), f"{entry.__name__}: the error does not name {argument}: {info.value}"


def assert_equal_to_truth(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """NaN where the float64 computation has NaN, the same infinities, and
    the finite values within the tolerance of the kernel tests (cases.py)."""
    assert got.shape == want.shape and got.device == want.device, f"{name}: {got.shape} {got.device}"
    dtype = got.dtype
    got = got.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN at other positions"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{name}: +inf at other positions"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{name}: -inf at other positions"
    finite = torch.isfinite(want)
    g, w = got[finite], want[finite]
    if w.numel() == 0:
        return
    rtol = RTOL[dtype]
    bound = rtol * max(float(w.abs().max()), 1e-6) + rtol * w.abs()
    err = (g - w).abs()
    assert bool((err <= bound).all()), f"{name}: error {float((err - bound).max()):.3e} over the bound"


def check_results(case: Case, out: torch.Tensor, grads: tuple, label: str) -> None:
    want_out, want_grads = float64_truth(case)
    inputs = (case.value, case.sampling_locations, case.attention_weights)
    assert out.dtype == case.value.dtype, f"{label}: output dtype {out.dtype}"
    # Compare in the output's own precision: the float64 truth rounded to it.
    assert_equal_to_truth(out, want_out.to(out.dtype).double(), f"{label} output")
    for got, want, inp, name in zip(grads, want_grads, inputs, ("grad_value", "grad_locations", "grad_weights")):
        assert got.dtype == inp.dtype, f"{label} {name}: dtype {got.dtype}, expected {inp.dtype}"
        assert_equal_to_truth(got, want.to(got.dtype).double(), f"{label} {name}")


@settings(max_examples=EXAMPLES)
@given(
    problem=problems(),
    dtypes=st.sampled_from(DTYPE_COMBINATIONS),
    special=st.booleans(),
    mistake=st.one_of(st.none(), st.sampled_from(sorted(MISTAKES))),
)
def test_every_entry_point_errors_by_name_or_equals_the_float64_computation(problem, dtypes, special,
                                                                             mistake: Optional[str]):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case(**problem, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    if special:
        case = with_special_values(case, problem["seed"])
    if mistake is not None:
        argument, values_only, change = MISTAKES[mistake]
        args = _inputs(case)
        args.update(change(case))
        entries = [_raw_backward, _emulated_backward] if argument == "grad_output" else [
            _public, _reference, _raw_forward, _raw_backward, _emulated_forward, _emulated_backward]
        for entry in entries:
            if values_only and entry in (_emulated_forward, _emulated_backward):
                continue
            assert_error_names(entry, args, argument)
        return
    check_results(case, *run_op(msda.ms_deform_attn, case), "public")
    check_results(case, *run_op(msda.ms_deform_attn_reference, case), "reference")
    check_results(case, _raw_forward(_inputs(case)), _raw_backward(_inputs(case)), "cpu op")
    check_results(case, _emulated_forward(_inputs(case)), _emulated_backward(_inputs(case)), "emulated cuda")
    # All on meta: the fake kernels give the shapes and dtypes, forward and backward.
    meta = [t.detach().to("meta").requires_grad_(t.is_floating_point()) for t in case.inputs]
    out = msda.ms_deform_attn(*meta)
    assert (out.shape, out.dtype, out.device.type) == ((*case.grad_output.shape,), case.value.dtype, "meta")
    out.backward(case.grad_output.to("meta"))
    for t in (meta[0], meta[3], meta[4]):
        assert (t.grad.shape, t.grad.dtype, t.grad.device.type) == (t.shape, t.dtype, "meta")
