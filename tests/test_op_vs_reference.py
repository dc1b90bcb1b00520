"""The compiled kernels against a float64 computation, on randomized problems
(hypothesis), forward and all three gradients, in every dtype and in the
mixed-precision combinations of spec §3."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msda
from cases import check_against_truth, make_case, run_op

DTYPE_COMBINATIONS = [
    # (value, sampling_locations, attention_weights)
    (torch.float64, torch.float64, torch.float64),
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.float16, torch.float32, torch.float32),  # what autocast produces
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float64, torch.float32, torch.float32),
]


@st.composite
def problems(draw):
    L = draw(st.integers(1, 5))
    shapes = [(draw(st.integers(1, 13)), draw(st.integers(1, 13))) for _ in range(L)]
    return dict(
        N=draw(st.integers(0, 3)),
        Lq=draw(st.integers(0, 50)),
        M=draw(st.integers(1, 8)),
        D=draw(st.integers(1, 80)),
        shapes=shapes,
        P=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**31 - 1)),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@pytest.mark.parametrize("dtypes", DTYPE_COMBINATIONS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@settings(max_examples=25)
@given(problem=problems())
def test_matches_float64_truth(dtypes, problem):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case(**problem, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    out, grads = run_op(msda.ms_deform_attn, case)
    check_against_truth(case, out, grads)


# The kernels pick code by channel count: blocks of 4, 2 and 1 vectors (8 or
# 16 float lanes, 4 or 8 double lanes), a scalar remainder, and in the backward
# register-held grad_output for widths of exactly 1, 2 or 4 vectors, and
# channel blocks from 64 channels on. These widths hit each of those paths
# whatever the vector width the build chose.
# Each width runs three times: with few samples per row of value (the kernels
# work on value in place, queries in memory order) and with many (the backward
# on per-head dense copies, csrc/cpu/head_copies.h; the forward visits the
# queries in strips, csrc/cpu/query_order.h: one strip on maps this narrow,
# four on the 130-wide map).
LAYOUTS = {
    "in place": dict(Lq=6, shapes=[(5, 6), (2, 3)]),  # 0.5 samples per row
    "per-head copies": dict(Lq=40, shapes=[(3, 4), (1, 2)]),  # 17 samples per row
    "query strips": dict(Lq=300, shapes=[(1, 130), (1, 65)]),  # 9 samples per row, 4 strips
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [1, 3, 4, 8, 12, 16, 24, 32, 40, 48, 64, 72, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_channel_path(layout, D, dtype):
    case = make_case(N=1, M=3, D=D, P=3, seed=D, value_dtype=dtype, **LAYOUTS[layout])
    out, grads = run_op(msda.ms_deform_attn, case)
    check_against_truth(case, out, grads)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_one_head_split_over_threads(threads):
    # One head, many queries per pixel: the work (forward: queries; backward:
    # the head's channel blocks) must give every thread a share; the result
    # must be the float64 truth's, and bitwise the same at any thread count.
    case = make_case(N=1, Lq=200, M=1, D=32, shapes=[(6, 8), (3, 4)], P=4, seed=3, value_dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_op(msda.ms_deform_attn, case)
        torch.set_num_threads(threads)
        out, grads = run_op(msda.ms_deform_attn, case)
    finally:
        torch.set_num_threads(previous)
    check_against_truth(case, out, grads)
    assert torch.equal(out, single[0])
    for got, want in zip(grads, single[1]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_strips_with_odd_first_points(threads, dtype):
    # The forward orders the queries by the x of their first point (head 0,
    # level 0, point 0). First points that are NaN, infinite, far outside or
    # on the strip edges must still give every query its own output, at any
    # thread count bitwise the same.
    case = make_case(N=2, Lq=300, M=2, D=16, shapes=[(2, 130), (1, 65)], P=2, seed=7, value_dtype=dtype,
                     loc_dtype=torch.float32)
    first_x = case.sampling_locations[:, :, 0, 0, 0, 0]
    first_x[:, 0::7] = float("nan")
    first_x[:, 1::7] = float("inf")
    first_x[:, 2::7] = -1e30
    first_x[:, 3::7] = 1.0
    first_x[:, 4::7] = 0.25  # exactly on a strip edge (4 strips)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = msda.ms_deform_attn(*case.inputs)
        torch.set_num_threads(threads)
        out, grads = run_op(msda.ms_deform_attn, case)
    finally:
        torch.set_num_threads(previous)
    check_against_truth(case, out, grads)
    assert torch.equal(out, single)


@pytest.mark.parametrize("D", [1025, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_channels(D, dtype):
    case = make_case(N=1, Lq=5, M=2, D=D, shapes=[(6, 5), (3, 2)], P=2, seed=D, value_dtype=dtype)
    out, grads = run_op(msda.ms_deform_attn, case)
    check_against_truth(case, out, grads)


def test_reference_matches_float64_truth_in_low_precision():
    # The fallback must follow the same dtype rules as the kernels.
    case = make_case(N=2, Lq=7, M=2, D=9, shapes=[(5, 7), (2, 3)], P=3, seed=1, value_dtype=torch.float16,
                     loc_dtype=torch.float32, attn_dtype=torch.float32)
    out, grads = run_op(msda.ms_deform_attn_reference, case)
    check_against_truth(case, out, grads)
