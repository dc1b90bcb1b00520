"""The CUDA kernels on a real GPU: against float64 and the CPU kernel, gradcheck,
a second device, opcheck, torch.compile, autocast, streams, determinism.

Skipped unless torch sees a GPU and msda was built with its CUDA kernels.
The test for tensors with more than 2**31 elements needs about 20 GB of GPU
memory and runs only with MSDA_TEST_LARGE=1.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings

import msda
from cases import Case, check_against_truth, deterministic_algorithms, level_tables, make_case, run_op
from msda import _extension
from test_op_vs_reference import DTYPE_COMBINATIONS, problems

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif("cuda" not in _extension.KERNEL_DEVICES, reason="msda was built without CUDA kernels"),
]


def on(case: Case, device) -> Case:
    return Case(*(t.to(device) for t in (case.value, case.spatial_shapes, case.level_start_index,
                                           case.sampling_locations, case.attention_weights, case.grad_output)))


def run_on_gpu(case: Case, device="cuda"):
    out, grads = run_op(msda.ms_deform_attn, on(case, device))
    torch.cuda.synchronize(device)
    return out.cpu(), tuple(g.cpu() for g in grads)


@pytest.mark.parametrize("dtypes", DTYPE_COMBINATIONS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@settings(max_examples=40)
@given(problem=problems())
def test_cuda_matches_float64_truth(dtypes, problem):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case(**problem, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    wh = case.spatial_shapes.flip(-1).double().view(1, 1, 1, -1, 1, 2)
    pixel = case.sampling_locations.double() * wh - 0.5
    # On the exact sampling boundary the spec's location gradient (zero) and
    # grid_sample's one-sided one differ (spec §1): compare elsewhere.
    if bool(((pixel == -1) | (pixel == wh)).any()):
        return
    check_against_truth(case, *run_on_gpu(case))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [1, 8, 32, 33, 64, 71, 256, 1025, 4096])
def test_cuda_agrees_with_cpu_kernel(dtype, D):
    case = make_case(N=2, Lq=9, M=3, D=D, shapes=[(7, 5), (4, 3), (1, 1)], P=3, seed=D, value_dtype=dtype)
    cpu_out, cpu_grads = run_op(msda.ms_deform_attn, case)
    gpu_out, gpu_grads = run_on_gpu(case)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gpu_out, cpu_out, rtol=tol, atol=tol)
    for got, want in zip(gpu_grads, cpu_grads):
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1.0))


@pytest.mark.parametrize("D", [1, 30, 32, 64, 71, 1025])
def test_gradcheck_on_cuda(D):
    case = on(make_case(N=2, Lq=3, M=2, D=D, shapes=[(4, 5), (2, 3)], P=2, seed=D, outside_fraction=0.2), "cuda")
    inputs = (case.value.requires_grad_(), case.spatial_shapes, case.level_start_index,
              case.sampling_locations.requires_grad_(), case.attention_weights.requires_grad_())
    assert torch.autograd.gradcheck(msda.ms_deform_attn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_with_the_first_current():
    case = make_case(N=2, Lq=6, M=2, D=32, shapes=[(6, 5), (3, 2)], P=2, seed=7, value_dtype=torch.float32)
    want_out, want_grads = run_on_gpu(case, "cuda:0")
    with torch.cuda.device(0):
        out, grads = run_on_gpu(case, "cuda:1")
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_level_tables_with_cuda_value_are_moved():
    case = make_case(N=1, Lq=4, M=2, D=8, shapes=[(4, 4), (2, 2)], P=2, seed=2, value_dtype=torch.float32)
    gpu = on(case, "cuda")
    out = msda.ms_deform_attn(gpu.value, case.spatial_shapes, case.level_start_index, gpu.sampling_locations,
                              gpu.attention_weights)
    want = msda.ms_deform_attn(*gpu.inputs)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_runs_on_the_current_stream():
    case = on(make_case(N=2, Lq=50, M=8, D=32, shapes=[(32, 32), (16, 16)], P=4, seed=3,
                        value_dtype=torch.float32), "cuda")
    want = msda.ms_deform_attn(*case.inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = msda.ms_deform_attn(*case.inputs)
    stream.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_on_cuda(dtype):
    case = on(make_case(N=2, Lq=4, M=2, D=8, shapes=[(3, 4), (2, 2)], P=2, seed=0, value_dtype=dtype), "cuda")
    args = (case.value.requires_grad_(), case.spatial_shapes, case.level_start_index,
            case.sampling_locations.requires_grad_(), case.attention_weights.requires_grad_())
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_forward.default, args)
    # The backward uses atomics: its result may differ in the last bits between runs.
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_backward.default, (*case.inputs, case.grad_output),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = msda.MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=3).cuda()
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.05)
        module.attention_weights.weight.normal_(0, 0.1)
    shapes, starts = level_tables([(8, 10), (4, 5)])
    shapes, starts = shapes.cuda(), starts.cuda()
    S = 8 * 10 + 4 * 5
    query, flat = torch.randn(2, 11, 64, device="cuda"), torch.randn(2, S, 64, device="cuda")
    reference = torch.rand(2, 11, 2, 2, device="cuda")

    def step(m):
        m.zero_grad()
        out = m(query, reference, flat, shapes, starts)
        out.square().sum().backward()
        return out.detach(), m.sampling_offsets.weight.grad.clone()

    eager = step(module)
    compiled = step(torch.compile(module, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_mixed_precision(dtype):
    torch.manual_seed(1)
    module = msda.MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=3).cuda()
    shapes, starts = level_tables([(8, 10), (4, 5)])
    shapes, starts = shapes.cuda(), starts.cuda()
    query = torch.randn(2, 11, 64, device="cuda")
    flat = torch.randn(2, 100, 64, device="cuda")
    reference = torch.rand(2, 11, 2, 2, device="cuda")
    want = module(query, reference, flat, shapes, starts)
    with torch.autocast("cuda", dtype=dtype):
        got = module(query, reference, flat, shapes, starts)
        got.float().square().sum().backward()
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))
    for p in module.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("D", [8, 33, 256])
def test_deterministic_backward_is_bitwise_reproducible(dtype, D):
    # Many queries on few pixels: the atomic algorithm's sums depend on the order.
    case = make_case(N=2, Lq=300, M=4, D=D, shapes=[(6, 5), (3, 2)], P=4, seed=D, value_dtype=dtype)
    with deterministic_algorithms():
        runs = [run_on_gpu(case) for _ in range(3)]
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert torch.equal(a, b)
    check_against_truth(case, *runs[0])


def test_wrong_level_tables_on_device_stay_in_bounds():
    case = make_case(N=2, Lq=4, M=2, D=8, shapes=[(4, 4), (2, 2)], P=2, seed=4, value_dtype=torch.float32)
    gpu = on(case, "cuda")
    for shapes, starts in [([[4, 4], [2**40, 2**40]], [0, 16]), ([[4, 4], [2, 2]], [0, 10**12]),
                           ([[-3, 4], [2, 2]], [0, -16])]:
        bad_shapes = torch.tensor(shapes, device="cuda")
        bad_starts = torch.tensor(starts, device="cuda")
        out = torch.ops.msda.ms_deform_attn_forward(gpu.value, bad_shapes, bad_starts, gpu.sampling_locations,
                                                    gpu.attention_weights)
        grads = torch.ops.msda.ms_deform_attn_backward(gpu.value, bad_shapes, bad_starts, gpu.sampling_locations,
                                                       gpu.attention_weights, gpu.grad_output)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0)])
def test_empty_problems_on_cuda(N, Lq):
    case = make_case(N=N, Lq=Lq, M=2, D=3, shapes=[(3, 3)], P=2, seed=0, value_dtype=torch.float32)
    out, grads = run_on_gpu(case)
    assert out.shape == (N, Lq, 6)
    assert all((g == 0).all() for g in grads)


@pytest.mark.skipif(os.environ.get("MSDA_TEST_LARGE", "0") in ("", "0"), reason="set MSDA_TEST_LARGE=1 (~20 GB)")
def test_more_than_2_31_elements():
    # value has 2**31 + 2**20 elements (float16, ~4 GB); queries sample the last rows.
    H, W, M, D = 2**15 + 2**4, 2**6, 1, 2**10
    value = torch.zeros(1, H * W, M, D, dtype=torch.float16, device="cuda")
    value[0, -W:, 0, :] = torch.arange(D, device="cuda").half() / D  # the last image row
    assert value.numel() > 2**31
    shapes, starts = level_tables([(H, W)])
    loc = torch.tensor([0.5, 1 - 0.5 / H], device="cuda").view(1, 1, 1, 1, 1, 2).expand(1, 3, 1, 1, 1, 2).contiguous()
    attn = torch.ones(1, 3, 1, 1, 1, device="cuda")
    out = msda.ms_deform_attn(value, shapes.cuda(), starts.cuda(), loc, attn)
    want = (torch.arange(D, device="cuda").half() / D).float()
    torch.testing.assert_close(out[0, 0].float(), want, rtol=1e-3, atol=1e-3)
    value.requires_grad_()
    out = msda.ms_deform_attn(value, shapes.cuda(), starts.cuda(), loc, attn)
    out.float().sum().backward()
    assert float(value.grad[0, -W:].float().sum()) == pytest.approx(3 * D, rel=1e-3)
    # (float32 rounding of the location may leak a sliver of weight to the row above)
    assert float(value.grad[0, : -2 * W].float().abs().sum()) == 0
