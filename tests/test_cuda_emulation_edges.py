"""Edges of the emulated CUDA kernels that the randomized tests do not reach:
the deterministic backward on empty and invalid problems (v1's kernels and
the v2 op's per-point tables), 16-bit forward sums that only a float32
accumulator gets right (emulated CUDA and the CPU kernels), and the launch
macro's argument order."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

import msda  # noqa: F401 (registers torch.ops.msda)
from cases import check_against_truth, level_tables, make_case

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
from build import REPO_ROOT, load_emulation  # noqa: E402


@pytest.fixture(scope="module")
def emu():
    module = load_emulation()
    module.set_seed(int(os.environ.get("MSDA_EMULATION_SEED", "12345")))
    return module


@pytest.fixture(scope="module")
def emu_v2():
    module = load_emulation(entry="emulated_ops_v2.cpp")
    module.set_seed(int(os.environ.get("MSDA_EMULATION_SEED", "12345")))
    return module


def deterministic_backward(op, *args):
    torch.use_deterministic_algorithms(True)
    try:
        return op(*args)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- the deterministic backward's edges

@pytest.mark.parametrize("N,Lq,D", [(2, 0, 4), (2, 3, 0), (0, 3, 4)], ids=["Lq0", "D0", "N0"])
def test_deterministic_backward_of_empty_problems(emu, N, Lq, D):
    # value keeps its rows (S = 13) where N > 0: with no query or no channel,
    # grad_value must still be all zeros (the deterministic path allocates it
    # without zeroing; the emulation fills fresh memory with junk).
    case = make_case(N=N, Lq=Lq, M=2, D=D, shapes=[(3, 3), (2, 2)], P=2, seed=0, value_dtype=torch.float32)
    grads = deterministic_backward(emu.backward, *case.inputs, case.grad_output)
    for grad, inp in zip(grads, (case.value, case.sampling_locations, case.attention_weights)):
        assert grad.shape == inp.shape and grad.dtype == inp.dtype
        assert bool((grad == 0).all())
    if N and Lq:
        assert grads[1].numel() > 0  # the D = 0 case has points: their gradients are zero too


@pytest.mark.parametrize(
    "shapes,starts",
    [([[4, 4], [2, 2]], [0, 1000]), ([[4, 4], [3, 3]], [0, 16]), ([[4, 4], [2**40, 2**40]], [0, 16]),
     ([[4, 4], [-2, 2]], [0, 16]), ([[4, 4], [2, 2]], [0, -5]), ([[0, 4], [2, 2]], [0, 16])],
)
def test_deterministic_backward_skips_invalid_levels(emu, shapes, starts):
    # As the atomic backward (test_cuda_emulation.py): a level outside value
    # contributes nothing, and no key of the deterministic sort leaves value's rows.
    good = make_case(N=2, Lq=4, M=2, D=4, shapes=[(4, 4), (2, 2)], P=2, seed=4, value_dtype=torch.float32)
    bad_inputs = (good.value, torch.tensor(shapes), torch.tensor(starts), good.sampling_locations,
                  good.attention_weights)
    valid = [l for l, ((h, w), s) in enumerate(zip(shapes, starts)) if h >= 1 and w >= 1 and 0 <= s and s + h * w <= 20]
    used = torch.zeros(2, dtype=torch.bool)
    used[valid] = True
    only_valid = good.attention_weights * used.view(1, 1, 1, 2, 1)
    grads = deterministic_backward(emu.backward, *bad_inputs, good.grad_output)
    want = deterministic_backward(emu.backward, *good.inputs[:4], only_valid, good.grad_output)
    torch.testing.assert_close(grads[0], want[0], rtol=1e-6, atol=1e-6)
    assert bool((grads[1][..., ~used, :, :] == 0).all()) and bool((grads[2][..., ~used, :] == 0).all())
    torch.testing.assert_close(grads[1][..., used, :, :], want[1][..., used, :, :], rtol=1e-6, atol=1e-6)
    # And the atomic algorithm agrees with it, against float64 on the valid level.
    check_against_truth(type(good)(good.value, good.spatial_shapes, good.level_start_index, good.sampling_locations,
                                   only_valid, good.grad_output), emu.forward(*good.inputs[:4], only_valid), want)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_v2_deterministic_backward_of_no_queries(emu_v2, method):
    from cases_v2 import make_case_v2

    case = make_case_v2(2, 0, 2, 4, [(3, 3), (2, 2)], [2, 1], method, seed=0, value_dtype=torch.float32)
    torch.use_deterministic_algorithms(True, warn_only=True)  # discrete: warns instead of refusing
    try:
        grads = emu_v2.backward(*case.args, case.grad_output)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(bool((g == 0).all()) and g.shape == t.shape
               for g, t in zip(grads, (case.value, case.sampling_locations, case.attention_weights)))


# ---------------------------------------------------------------- 16-bit forward sums

# Two samples of one pixel (bilinear weight 1 at its centre, or the discrete
# pixel) with float32 weights 1 + eps and -1, as autocast hands them over:
# the exact sum is eps * value, which the 16-bit dtype holds. eps is below
# half an ulp of 1 in that dtype, so a kernel that rounds each term to 16 bits
# before adding gets (value) - (value) = 0.
EPS = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def two_samples_of_one_pixel(dtype: torch.dtype, D: int, centre: float):
    eps = EPS[dtype]
    assert float(torch.tensor(1 + eps, dtype=torch.float32).to(dtype)) == 1.0
    value = (torch.rand(1, 4, 1, D, generator=torch.Generator().manual_seed(D), dtype=torch.float64) + 0.5).to(dtype)
    shapes, starts = level_tables([(2, 2)])
    loc = torch.full((1, 1, 1, 2, 2), centre, dtype=torch.float32)  # pixel (0, 0), twice
    attn = torch.tensor([1 + eps, -1.0], dtype=torch.float32).view(1, 1, 1, 2)
    want = (value[0, 0, 0].double() * eps).to(dtype)
    assert bool((want != 0).all()) and torch.equal(want.double(), value[0, 0, 0].double() * eps)  # exact in dtype
    return value, shapes, starts, loc, attn, want.view(1, 1, D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [1, 8, 264])
@pytest.mark.parametrize("backend", ["emulated-cuda", "cpu"])
def test_16bit_forward_sums_in_float32(emu, emu_v2, backend, dtype, D):
    value, shapes, starts, loc, attn, want = two_samples_of_one_pixel(dtype, D, 0.25)
    v1_loc, v1_attn = loc.view(1, 1, 1, 1, 2, 2), attn.view(1, 1, 1, 1, 2)
    v1 = emu.forward if backend == "emulated-cuda" else torch.ops.msda.ms_deform_attn_forward
    v2 = emu_v2.forward if backend == "emulated-cuda" else torch.ops.msda.ms_deform_attn_v2_forward
    results = {"v1": v1(value, shapes, starts, v1_loc, v1_attn),
               "v2 default": v2(value, shapes, starts, loc, attn, [2], "default")}
    # Discrete: trunc(0.25 * 2 + 0.5) = 1 would be pixel 1; 0.0 reads pixel 0.
    loc0 = torch.zeros_like(loc)
    results["v2 discrete"] = v2(value, shapes, starts, loc0, attn, [2], "discrete")
    for name, out in results.items():
        assert out.dtype == dtype
        assert torch.equal(out, want), f"{name}: {out.flatten()[:4].tolist()} instead of {want.flatten()[:4].tolist()}"


# ---------------------------------------------------------------- the launch macro

def macro(path: str) -> tuple[list[str], str]:
    """Parameters and body of the MSDA_LAUNCH #define in a file."""
    text = open(path).read().replace("\\\n", " ")
    m = re.search(r"#define MSDA_LAUNCH\(([^)]*)\)(.*)", text)
    assert m, f"no MSDA_LAUNCH in {path}"
    return [p.strip() for p in m.group(1).split(",")], m.group(2)


def test_launch_macro_takes_grid_and_block_in_the_real_order(emu):
    # The real macro (not emulated: it needs nvcc) launches
    # kernel<<<grid, block, shared_bytes, stream>>>; the emulation's passes
    # the same parameters, in that order, to launch(kernel, grid, block,
    # shared bytes, ...). A kernel sees what it was launched with.
    csrc = os.environ.get("MSDA_EMULATION_CSRC") or os.path.join(REPO_ROOT, "csrc")
    real_params, real_body = macro(os.path.join(csrc, "cuda", "launch_check.h"))
    emu_params, emu_body = macro(os.path.join(REPO_ROOT, "tests", "cuda_emulation", "emulated_launch.h"))
    assert real_params == emu_params == ["kernel", "grid", "block", "shared_bytes", "stream", "..."]
    chevrons = re.search(r"<<<(.*?)>>>", real_body).group(1)
    assert [a.strip(" ()") for a in chevrons.split(",")] == ["grid", "block", "shared_bytes", "stream"]
    call = re.search(r"::msda_emu::launch\((.*?)\)", emu_body).group(1)
    assert [a.strip() for a in call.split(",")] == ["kernel", "grid", "block", "shared_bytes", "__VA_ARGS__"]
    out = torch.zeros(2)
    emu.selftest("launch_dims", torch.zeros(1), out, threads=64, blocks=3)
    assert out.tolist() == [3.0, 64.0]  # gridDim.x, blockDim.x


def test_v1_and_v2_modules_keep_their_own_emulator_state(emu, emu_v2):
    # Both modules in one process (as in a test run): each has its own
    # emulator, so neither's launches, grid cap or shared-memory layout (the
    # red zones, and under TSan the per-block shared memory) leak into the other.
    case = make_case(N=1, Lq=2, M=1, D=4, shapes=[(2, 2)], P=1, seed=0, value_dtype=torch.float32)
    before_v1, before_v2 = emu.stats()["launches"], emu_v2.stats()["launches"]
    emu.forward(*case.inputs)
    assert emu.stats()["launches"] == before_v1 + 1
    assert emu_v2.stats()["launches"] == before_v2
