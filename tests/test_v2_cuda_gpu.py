"""The v2 op's CUDA kernels and the deterministic backward on a real GPU:
float64 truth in both methods, the deterministic refusal of the discrete
backward, the discrete index's exact boundaries and product rounding (the
device-only __fmul_rn branch that the emulation never compiles), 16-bit
forward sums, wrong level tables.

Skipped unless torch sees a GPU and msda was built with its CUDA kernels
(scripts/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import msda
from cases import deterministic_algorithms
from cases_v2 import CaseV2, check_against_truth_v2, make_case_v2, run_op_v2
from msda import _extension
from test_op_vs_reference import DTYPE_COMBINATIONS
from test_v2_op import problems_v2

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif("cuda" not in _extension.KERNEL_DEVICES, reason="msda was built without CUDA kernels"),
]


def on_gpu(case: CaseV2) -> CaseV2:
    tensors = (case.value, case.spatial_shapes, case.level_start_index, case.sampling_locations,
               case.attention_weights, case.grad_output)
    return CaseV2(*(t.cuda() for t in tensors), case.points, case.method)


def run_on_gpu(case: CaseV2):
    out, grads = run_op_v2(msda.ms_deform_attn_v2, on_gpu(case))
    torch.cuda.synchronize()
    return out.cpu(), tuple(g.cpu() for g in grads)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtypes", DTYPE_COMBINATIONS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@settings(max_examples=20, deadline=None)
@given(problem=problems_v2())
def test_v2_cuda_matches_float64_truth(method, dtypes, problem):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case_v2(**problem, method=method, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    if method == "default":  # off the sampling window's edge, as the emulation tests
        from test_v2_cuda_emulation import without_window_edges

        case = without_window_edges(case)
    check_against_truth_v2(case, *run_on_gpu(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_v2_default_deterministic_backward(dtype):
    case = make_case_v2(2, 40, 2, 8, [(3, 4), (2, 2)], [4, 2], "default", seed=1, value_dtype=dtype)
    with deterministic_algorithms():
        runs = [run_on_gpu(case) for _ in range(3)]
    for out, grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    check_against_truth_v2(case, *runs[0])


def test_v2_discrete_backward_refuses_deterministic_mode():
    case = on_gpu(make_case_v2(1, 3, 2, 4, [(3, 4)], [2], "discrete", seed=1, value_dtype=torch.float32))
    with deterministic_algorithms(), pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        torch.ops.msda.ms_deform_attn_v2_backward(*case.args, case.grad_output)


def test_discrete_index_boundaries_and_product_rounding_on_the_device():
    # The same cases the emulation runs (tests/test_v2_cuda_emulation.py),
    # here through the device-only branch (__fmul_rn).
    from test_v2_edge_cases import product_rounding_cases

    loc, side = product_rounding_cases()
    exact = [((k - 0.5) / w, w) for w in (1, 2, 4, 8, 16) for k in range(w + 1)] + [(0.5, 1), (1.0, 8)]
    loc = torch.cat([loc, torch.tensor([x for x, _ in exact], dtype=torch.float32)])
    side = torch.cat([side, torch.tensor([w for _, w in exact])])
    want = torch.trunc(loc * side.float() + 0.5).long().clamp(max=side - 1).clamp(min=0)  # rounded product, then + 0.5
    for x, w, expect in zip(loc.tolist(), side.tolist(), want.tolist()):
        value = torch.arange(1, w + 1, dtype=torch.float32, device="cuda").view(1, w, 1, 1)
        out = msda.ms_deform_attn_v2(value, torch.tensor([[1, w]], device="cuda"), torch.tensor([0], device="cuda"),
                                     torch.tensor([x, 0.5], device="cuda").view(1, 1, 1, 1, 2),
                                     torch.ones(1, 1, 1, 1, device="cuda"), [1], "discrete")
        assert int(out.item()) == expect + 1, (x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_forward_sums_in_float32_on_the_device(dtype):
    from test_cuda_emulation_edges import two_samples_of_one_pixel

    value, shapes, starts, loc, attn, want = (t.cuda() for t in two_samples_of_one_pixel(dtype, 8, 0.25))
    assert torch.equal(msda.ms_deform_attn_v2(value, shapes, starts, loc, attn, [2], "default").cpu(), want.cpu())
    out = msda.ms_deform_attn_v2(value, shapes, starts, torch.zeros_like(loc), attn, [2], "discrete")
    assert torch.equal(out.cpu(), want.cpu())


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_v2_wrong_level_tables_on_device_stay_in_bounds(method):
    case = make_case_v2(2, 4, 2, 4, [(4, 4), (2, 2)], [2, 3], method, seed=4, value_dtype=torch.float32)
    bad = CaseV2(case.value, torch.tensor([[4, 4], [2**40, 2**40]]), torch.tensor([0, 16]), case.sampling_locations,
                 case.attention_weights, case.grad_output, case.points, method)
    out, grads = run_on_gpu(bad)
    assert bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[2][..., 2:] == 0).all())
