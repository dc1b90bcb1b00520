"""The CUDA kernels, executed on the CPU by the CUDA emulation harness.

tests/cuda_emulation/ compiles the kernels' device code and the host launch
code of csrc/cuda unchanged as host C++ (one fiber per CUDA thread, real grid
and block sizes, strict barriers, shuffles and alignment). These tests run
the emulated CUDA forward and backward on the randomized cases of the CPU
kernel tests, in every dtype combination, and compare with float64.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import check_against_truth, level_tables, make_case
from test_op_vs_reference import DTYPE_COMBINATIONS, problems

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
from build import load_emulation  # noqa: E402

# As many examples as the CPU kernel tests; MSDA_EMULATION_EXAMPLES changes it.
EXAMPLES = int(os.environ.get("MSDA_EMULATION_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def emu():
    module = load_emulation()
    module.set_seed(int(os.environ.get("MSDA_EMULATION_SEED", "12345")))
    return module


def off_the_sampling_boundary(case):
    """Move locations whose pixel coordinate is exactly -1 or W (H) further out.

    There the spec's strict window gives a zero location gradient while
    grid_sample's one-sided gradient does not (spec §1); rounding to 16 bits
    lands on such points often on 1- and 2-pixel maps. A quarter pixel further
    out survives the rounding, and both then agree on zero.
    """
    loc = case.sampling_locations.double()
    wh = case.spatial_shapes.flip(-1).double().view(1, 1, 1, -1, 1, 2)
    pixel = loc * wh - 0.5
    low, high = pixel == -1, pixel == wh
    if not bool((low | high).any()):
        return case
    moved = torch.where(low, -0.75 / wh, torch.where(high, (wh + 0.75) / wh, loc))
    return make_case_like(case, sampling_locations=moved.to(case.sampling_locations.dtype))


def run_emulated(emu, case):
    out = emu.forward(*case.inputs)
    grads = emu.backward(*case.inputs, case.grad_output)
    return out, grads


@pytest.mark.parametrize("dtypes", DTYPE_COMBINATIONS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@settings(max_examples=EXAMPLES)
@given(problem=problems())
def test_emulated_cuda_matches_float64_truth(emu, dtypes, problem):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case(**problem, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    case = off_the_sampling_boundary(case)
    check_against_truth(case, *run_emulated(emu, case))


# Each kernel variant and launch shape at least once: vectorised and scalar
# channels, warp-segment widths 1..32, the block kernel with one and several
# warps, more channel groups than threads, and more than one shared-memory
# round of (l, p) points (L*P > 32).
@pytest.mark.parametrize(
    "D,dtype,P",
    [
        (1, torch.float32, 2),  # width 1
        (3, torch.float64, 3),  # scalar, width 4
        (8, torch.float16, 2),  # one 8-wide vector
        (16, torch.bfloat16, 3),  # width 2
        (12, torch.float32, 2),  # float4 x 3 -> width 4 with an idle lane
        (32, torch.float32, 2),  # width 8
        (128, torch.float32, 2),  # 32 float4 groups: width 32, a whole warp
        (64, torch.float64, 2),  # 32 double2 groups
        (33, torch.float32, 2),  # block kernel, 2 warps
        (264, torch.float16, 2),  # 33 half8 groups: block kernel, vectorised
        (1025, torch.float32, 2),  # block kernel, 256 threads looping over groups
        (4096, torch.float32, 1),  # 1024 float4 groups
        (33, torch.float32, 9),  # block kernel with L*P = 36 > 32: two shared-memory rounds
        (40, torch.float32, 9),  # warp kernel with L*P = 36
    ],
)
def test_each_kernel_variant(emu, D, dtype, P):
    case = make_case(N=2, Lq=3, M=2, D=D, shapes=[(5, 4), (3, 2), (2, 3), (1, 1)], P=P, seed=D, value_dtype=dtype)
    check_against_truth(case, *run_emulated(emu, case))


def test_misaligned_value_uses_the_scalar_path(emu):
    # A value tensor starting 4 bytes past a 16-byte boundary: a float4 load
    # would be misaligned (the emulation asserts it), so the launcher must not
    # vectorise even though D is a multiple of 4.
    case = make_case(N=2, Lq=4, M=2, D=8, shapes=[(4, 4), (2, 3)], P=2, seed=3, value_dtype=torch.float32)
    storage = torch.empty(case.value.numel() + 4, dtype=torch.float32)
    offset = next(i for i in range(4) if (storage.data_ptr() + 4 * i) % 16 == 4)
    shifted = storage[offset : offset + case.value.numel()].view_as(case.value)
    shifted.copy_(case.value)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    case.value = shifted
    case.grad_output = torch.empty(case.grad_output.numel() + 1, dtype=torch.float32)[1:].view_as(
        case.grad_output).copy_(case.grad_output)
    check_against_truth(case, *run_emulated(emu, case))


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0), (0, 0)])
def test_empty_problems(emu, N, Lq):
    case = make_case(N=N, Lq=Lq, M=2, D=3, shapes=[(3, 3)], P=2, seed=0, value_dtype=torch.float32)
    out, grads = run_emulated(emu, case)
    assert out.shape == (N, Lq, 6)
    for grad, inp in zip(grads, (case.value, case.sampling_locations, case.attention_weights)):
        assert grad.shape == inp.shape and grad.dtype == inp.dtype
        assert (grad == 0).all()


def test_non_contiguous_inputs(emu):
    case = make_case(N=2, Lq=5, M=3, D=8, shapes=[(4, 5), (2, 2)], P=2, seed=9, value_dtype=torch.float32)
    want_out, want_grads = run_emulated(emu, case)
    transposed = case.value.transpose(0, 1).contiguous().transpose(0, 1)
    loc = case.sampling_locations.transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = case.grad_output.transpose(1, 2).contiguous().transpose(1, 2)
    assert not transposed.is_contiguous() and not loc.is_contiguous() and not grad_out.is_contiguous()
    out = emu.forward(transposed, case.spatial_shapes, case.level_start_index, loc, case.attention_weights)
    grads = emu.backward(transposed, case.spatial_shapes, case.level_start_index, loc, case.attention_weights, grad_out)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
def test_far_and_non_finite_locations_contribute_nothing(emu, bad):
    case = make_case(N=2, Lq=6, M=2, D=5, shapes=[(4, 3), (2, 2)], P=3, seed=0, value_dtype=torch.float32)
    hit = torch.zeros(case.attention_weights.shape, dtype=torch.bool)
    hit[0, 1, 0, 1, 2] = hit[1, 4, 1, 0, 0] = True
    loc = case.sampling_locations.clone()
    loc[hit] = torch.tensor([bad, 0.5])
    out, (grad_value, grad_loc, grad_attn) = run_emulated(
        emu, make_case_like(case, sampling_locations=loc))
    zero_attn = case.attention_weights.masked_fill(hit, 0)
    want, _ = run_emulated(emu, make_case_like(case, attention_weights=zero_attn))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(grad_value).all() and torch.isfinite(grad_loc).all() and torch.isfinite(grad_attn).all()
    assert (grad_loc[hit] == 0).all() and (grad_attn[hit] == 0).all()


def make_case_like(case, **changes):
    fields = dict(value=case.value, spatial_shapes=case.spatial_shapes, level_start_index=case.level_start_index,
                  sampling_locations=case.sampling_locations, attention_weights=case.attention_weights,
                  grad_output=case.grad_output)
    fields.update(changes)
    return type(case)(**fields)


@pytest.mark.parametrize(
    "shapes,starts",
    [
        ([[4, 4], [2, 2]], [0, 1000]),  # level 1 starts past the end
        ([[4, 4], [3, 3]], [0, 16]),  # level 1 runs past the end
        ([[4, 4], [2**40, 2**40]], [0, 16]),  # H*W overflows int64
        ([[4, 4], [-2, 2]], [0, 16]),
        ([[4, 4], [2, 2]], [0, -5]),
        ([[0, 4], [2, 2]], [0, 16]),  # an empty level 0
    ],
)
def test_wrong_level_tables_skip_the_level_instead_of_reading_out_of_bounds(emu, shapes, starts):
    # On the GPU nobody reads spatial_shapes/level_start_index on the host, so
    # the kernels must stay inside value whatever they say: a level that does
    # not fit in S contributes nothing. The emulation treats these CPU tensors
    # as device memory (no value checks), like the CUDA op.
    good = make_case(N=2, Lq=4, M=2, D=4, shapes=[(4, 4), (2, 2)], P=2, seed=4, value_dtype=torch.float32)
    bad = make_case_like(good, spatial_shapes=torch.tensor(shapes), level_start_index=torch.tensor(starts))
    out, grads = run_emulated(emu, bad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    valid = [l for l, ((h, w), s) in enumerate(zip(shapes, starts)) if h >= 1 and w >= 1 and 0 <= s and s + h * w <= 20]
    level_used = torch.zeros(2, dtype=torch.bool)
    level_used[valid] = True
    only_valid = good.attention_weights * level_used.view(1, 1, 1, 2, 1)
    want, _ = run_emulated(emu, make_case_like(good, attention_weights=only_valid))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert (grads[2][..., ~level_used, :] == 0).all()


def test_backward_under_deterministic_algorithms_raises_torchs_error(emu):
    case = make_case(N=1, Lq=2, M=1, D=4, shapes=[(2, 2)], P=1, seed=0, value_dtype=torch.float32)
    emu.forward(*case.inputs)  # the forward is deterministic
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            emu.backward(*case.inputs, case.grad_output)
    finally:
        torch.use_deterministic_algorithms(False)


def test_argument_errors_name_the_argument(emu):
    case = make_case(N=1, Lq=2, M=1, D=4, shapes=[(2, 2)], P=1, seed=0, value_dtype=torch.float32)
    with pytest.raises(ValueError, match="sampling_locations must have shape"):
        emu.forward(case.value, case.spatial_shapes, case.level_start_index, case.sampling_locations[..., 0],
                    case.attention_weights)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        emu.backward(*case.inputs, case.grad_output[:, :1])


@settings(max_examples=200)
@given(a=st.integers(0, 2**63 - 1), b=st.integers(1, 2**63 - 1), small=st.booleans())
def test_index_division_helper(emu, a, b, small):
    # The kernels divide 64-bit indices in 32 bits when they fit, else by
    # shift-and-subtract (no spilling subroutine call on the GPU).
    if small:
        a, b = a % 2**32, b % 2**32 or 1
    assert emu.div_floor(a, b) == a // b


def test_int32_level_tables(emu):
    shapes, starts = level_tables([(3, 4), (2, 2)], torch.int32)
    case = make_case(N=1, Lq=3, M=2, D=6, shapes=[(3, 4), (2, 2)], P=2, seed=2, index_dtype=torch.int32)
    assert case.spatial_shapes.dtype == torch.int32 and torch.equal(case.spatial_shapes, shapes)
    check_against_truth(case, *run_emulated(emu, case))
