"""The v2 op (points per level, default and discrete sampling) against a
float64 computation on randomized problems, in every dtype combination of
spec §3; gradcheck in float64; bitwise equality with v1 in the uniform case;
determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msda
from cases_v2 import check_against_truth_v2, make_case_v2, run_op_v2
from test_op_vs_reference import DTYPE_COMBINATIONS

METHODS = ["default", "discrete"]


@st.composite
def problems_v2(draw):
    L = draw(st.integers(1, 4))
    shapes = [(draw(st.integers(1, 13)), draw(st.integers(1, 13))) for _ in range(L)]
    points = [draw(st.integers(0, 6)) for _ in range(L)]
    if sum(points) == 0:
        points[0] = 1
    return dict(
        N=draw(st.integers(0, 3)),
        Lq=draw(st.integers(0, 40)),
        M=draw(st.integers(1, 8)),
        D=draw(st.integers(1, 80)),
        shapes=shapes,
        points=points,
        seed=draw(st.integers(0, 2**31 - 1)),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtypes", DTYPE_COMBINATIONS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@settings(max_examples=12)
@given(problem=problems_v2())
def test_matches_float64_truth(method, dtypes, problem):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case_v2(**problem, method=method, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    check_against_truth_v2(case, *run_op_v2(msda.ms_deform_attn_v2, case))


# The decoder shapes of RT-DETRv2 / D-FINE, scaled down, with per-head copies
# (many queries per pixel) and in place (few), so both v1 kernel paths and
# channel blocks (D >= 128 splits into blocks when N*M is small) run.
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "N,Lq,M,D,shapes",
    [
        (2, 30, 8, 32, [(8, 8), (4, 4), (2, 2)]),  # in place
        (1, 60, 2, 32, [(3, 4), (2, 2), (1, 1)]),  # per-head copies
        (1, 5, 1, 200, [(6, 5), (3, 3), (1, 2)]),  # channel blocks
    ],
)
@pytest.mark.parametrize("points", [[3, 6, 3], [1, 0, 5], [4, 4, 4]])
def test_decoder_like_shapes(method, N, Lq, M, D, shapes, points):
    case = make_case_v2(N, Lq, M, D, shapes, points, method, seed=sum(points) + D)
    check_against_truth_v2(case, *run_op_v2(msda.ms_deform_attn_v2, case))


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_float64(method):
    case = make_case_v2(2, 4, 2, 3, [(3, 4), (2, 2), (1, 3)], [2, 3, 1], method, seed=7)
    # Discrete: locations get no gradient (a piecewise-constant function),
    # so only value and weights are checked.
    loc_grad = method == "default"
    value = case.value.detach().clone().requires_grad_()
    loc = case.sampling_locations.detach().clone().requires_grad_(loc_grad)
    attn = case.attention_weights.detach().clone().requires_grad_()

    def f(v, lo, a):
        return msda.ms_deform_attn_v2(v, case.spatial_shapes, case.level_start_index, lo, a, case.points, method)

    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_uniform_default_is_bitwise_v1(dtype):
    case = make_case_v2(2, 20, 4, 24, [(6, 7), (3, 4), (2, 2)], [4, 4, 4], "default", seed=3, value_dtype=dtype)
    out, grads = run_op_v2(msda.ms_deform_attn_v2, case)
    L, P = 3, 4

    def v1(value, spatial_shapes, level_start_index, loc, attn, points, method):
        return msda.ms_deform_attn(
            value, spatial_shapes, level_start_index, loc.unflatten(3, (L, P)), attn.unflatten(3, (L, P))
        )

    out1, grads1 = run_op_v2(v1, case)
    assert torch.equal(out, out1)
    for g, g1 in zip(grads, grads1):
        assert torch.equal(g, g1)


def test_kernel_path_agrees_with_v1_path():
    # Uniform points go to v1's op; adding a level with zero points sends the
    # same problem to the v2 kernels (per-point level table): same sums.
    case = make_case_v2(1, 10, 2, 16, [(5, 5), (3, 3)], [3, 3], "default", seed=11)
    out_v1 = msda.ms_deform_attn_v2(*case.args)
    spatial_shapes = torch.cat([case.spatial_shapes, torch.tensor([[1, 1]])])
    value = torch.cat([case.value, torch.zeros(1, 1, 2, 16, dtype=case.value.dtype)], dim=1)
    level_start_index = torch.cat([case.level_start_index, torch.tensor([34])])
    out_kernel = msda.ms_deform_attn_v2(
        value, spatial_shapes, level_start_index, case.sampling_locations, case.attention_weights, [3, 3, 0]
    )
    torch.testing.assert_close(out_kernel, out_v1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_over_threads(method):
    case = make_case_v2(1, 50, 2, 160, [(9, 9), (5, 5), (3, 3)], [3, 6, 3], method, seed=5,
                        value_dtype=torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for _ in range(2):
                results.append(run_op_v2(msda.ms_deform_attn_v2, case))
    finally:
        torch.set_num_threads(threads)
    out0, grads0 = results[0]
    for out, grads in results[1:]:
        assert torch.equal(out, out0)
        for g, g0 in zip(grads, grads0):
            assert torch.equal(g, g0)
