"""Zero-sized dimensions (spec §2), for every kernel and entry point.

N, Lq, M, D and P = 0 are valid, alone and in every combination: the output
is empty or zeros and every gradient is zero (or empty), never uninitialised
memory. L = 0, S = 0 and a level with H or W = 0 are errors naming
spatial_shapes. Checked for the CPU kernels (raw ops, on a heap dirtied with
NaN so that an unwritten output shows), the CUDA kernels (run by the CPU
emulation, which fills fresh outputs with NaN), the fake kernels (FakeTensor
and meta tensors: shapes, dtypes, devices), the public function (autograd)
and the reference, forward and backward, against the float64 computation.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import msda
from cases import Case, float64_truth, level_tables, make_case, run_op
from emulation import emulation

OPS = torch.ops.msda
DIMS = ("N", "Lq", "M", "D", "P")
ZERO_SETS = [zero for r in range(1, len(DIMS) + 1) for zero in itertools.combinations(DIMS, r)]
# Two sizes, so that both CPU work splits run: per item (few samples per row
# of value) and per head on dense copies (many samples per row; head_copies.h).
BASES = {
    "items": dict(N=2, Lq=3, M=2, D=5, P=2, shapes=[(3, 2), (1, 2)]),
    "head-copies": dict(N=1, Lq=40, M=1, D=130, P=3, shapes=[(2, 2), (2, 2)]),
}
DTYPES = [torch.float64, torch.float32, torch.float16]


def zero_case(base: str, zero: tuple[str, ...], dtype: torch.dtype, poisoned: bool) -> Case:
    sizes = dict(BASES[base])
    sizes.update({dim: 0 for dim in zero})
    case = make_case(**sizes, seed=len(zero), value_dtype=dtype)
    if poisoned:
        # Nothing is sampled, so even NaN values and weights give zeros.
        case.value = torch.full_like(case.value, float("nan"))
        case.attention_weights = torch.full_like(case.attention_weights, float("inf"))
    return case


def dirty_heap(case: Case) -> None:
    # Free NaN-filled blocks of the sizes the op allocates next, so that an
    # output it forgets to write comes back NaN rather than lucky zeros.
    for t in (case.value, case.sampling_locations, case.attention_weights, case.grad_output):
        junk = torch.full((max(1, t.numel()) * 2,), float("nan"))
        del junk


def run_cpu(case: Case):
    dirty_heap(case)
    out = OPS.ms_deform_attn_forward(*case.inputs)
    dirty_heap(case)
    return out, OPS.ms_deform_attn_backward(*case.inputs, case.grad_output)


def run_emulated_cuda(case: Case):
    emu = emulation()
    return emu.forward(*case.inputs), emu.backward(*case.inputs, case.grad_output)


RUNNERS = {
    "cpu": run_cpu,
    "emulated-cuda": run_emulated_cuda,
    "public": lambda case: run_op(msda.ms_deform_attn, case),
    "reference": lambda case: run_op(msda.ms_deform_attn_reference, case),
}


def expected(case: Case):
    N, _, M, D = case.value.shape
    out = torch.zeros(N, case.sampling_locations.shape[1], M * D, dtype=case.value.dtype)
    return out, tuple(torch.zeros_like(t) for t in (case.value, case.sampling_locations, case.attention_weights))


def assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    assert got.device == want.device, f"{name}: device {got.device}, expected {want.device}"
    if got.device.type != "meta":
        assert torch.equal(got, want), f"{name}: {int((got != want).sum())} elements differ from {want.flatten()[:1]}"


NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


@pytest.mark.parametrize("poisoned", [False, True], ids=["random", "nan-inputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("zero", ZERO_SETS, ids="-".join)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("runner", RUNNERS)
def test_zero_sized_dimensions_write_every_output(runner, base, zero, dtype, poisoned):
    case = zero_case(base, zero, dtype, poisoned)
    out, grads = RUNNERS[runner](case)
    want_out, want_grads = expected(case)
    for got, want, name in zip((out, *grads), (want_out, *want_grads), NAMES):
        assert_same(got, want, name)
    # the float64 computation agrees (through the grid_sample reference)
    truth_out, truth_grads = float64_truth(case)
    for got, want, name in zip((out, *grads), (truth_out, *truth_grads), NAMES):
        assert torch.equal(got.double(), want), f"{name} differs from the float64 computation"


@pytest.mark.parametrize("device", ["fake", "meta"])
@pytest.mark.parametrize("zero", ZERO_SETS, ids="-".join)
@pytest.mark.parametrize("base", BASES)
def test_fake_kernels_give_the_shapes_of_zero_sized_problems(device, base, zero):
    case = zero_case(base, zero, torch.float32, poisoned=False)
    if device == "fake":
        with FakeTensorMode() as mode:
            inputs = [mode.from_tensor(t) for t in case.inputs]
            out = OPS.ms_deform_attn_forward(*inputs)
            grads = OPS.ms_deform_attn_backward(*inputs, mode.from_tensor(case.grad_output))
            got = [(t.shape, t.dtype, t.device) for t in (out, *grads)]
    else:
        inputs = [t.to("meta") for t in case.inputs]
        out = OPS.ms_deform_attn_forward(*inputs)
        grads = OPS.ms_deform_attn_backward(*inputs, case.grad_output.to("meta"))
        got = [(t.shape, t.dtype, t.device) for t in (out, *grads)]
    want_out, want_grads = expected(case)
    want_device = torch.device("cpu" if device == "fake" else "meta")
    for (shape, dtype, dev), want, name in zip(got, (want_out, *want_grads), NAMES):
        assert (shape, dtype, dev) == (want.shape, want.dtype, want_device), name


def _no_level_inputs(zero: tuple[str, ...]):
    sizes = dict(N=2, Lq=3, M=2, D=4, P=2)
    sizes.update({dim: 0 for dim in zero})
    N, Lq, M, D, P = (sizes[d] for d in DIMS)
    return (
        torch.rand(N, 4, M, D),
        torch.zeros(0, 2, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        torch.rand(N, Lq, M, 0, P, 2),
        torch.rand(N, Lq, M, 0, P),
    ), torch.rand(N, Lq, M * D)


def _call(entry: str, inputs, grad_output):
    if entry == "cpu-forward":
        return OPS.ms_deform_attn_forward(*inputs)
    if entry == "cpu-backward":
        return OPS.ms_deform_attn_backward(*inputs, grad_output)
    if entry == "emulated-cuda-forward":
        return emulation().forward(*inputs)
    if entry == "emulated-cuda-backward":
        return emulation().backward(*inputs, grad_output)
    if entry == "fake":
        with FakeTensorMode() as mode:
            return OPS.ms_deform_attn_backward(*[mode.from_tensor(t) for t in (*inputs, grad_output)])
    if entry == "meta":
        return msda.ms_deform_attn(*[t.to("meta") for t in inputs])
    if entry == "public":
        return msda.ms_deform_attn(*inputs)
    return msda.ms_deform_attn_reference(*inputs)


ENTRIES = ["cpu-forward", "cpu-backward", "emulated-cuda-forward", "emulated-cuda-backward", "fake", "meta",
           "public", "reference"]


@pytest.mark.parametrize("zero", [(), ("N",), ("D",), ("Lq", "P"), DIMS], ids=lambda z: "-".join(z) or "none")
@pytest.mark.parametrize("entry", ENTRIES)
def test_no_levels_is_an_error_naming_spatial_shapes(entry, zero):
    inputs, grad_output = _no_level_inputs(zero)
    message = "spatial_shapes must describe at least one level (L >= 1), got (0, 2)"
    with pytest.raises(ValueError, match=re.escape(message)):
        _call(entry, inputs, grad_output)


# The checks that read spatial_shapes run where its values are on the CPU
# (spec §4): the CPU kernels, the public function and the reference. (On the
# GPU the kernels skip such a level instead: tests/test_cuda_emulation.py.)
VALUE_CHECKING_ENTRIES = ["cpu-forward", "cpu-backward", "public", "reference"]


@pytest.mark.parametrize(
    "shapes,S,message",
    [
        ([(0, 3)], 0, "got (H, W) = (0, 3) at level 0"),
        ([(3, 0)], 0, "got (H, W) = (3, 0) at level 0"),
        ([(2, 2), (0, 5)], 4, "got (H, W) = (0, 5) at level 1"),
        ([(2, 2), (1, 0)], 4, "got (H, W) = (1, 0) at level 1"),
        ([(0, 0)], 0, "got (H, W) = (0, 0) at level 0"),
        ([(1, 1)], 0, "(H, W) = (1, 1) at level 0"),  # S = 0 with a valid level
    ],
)
@pytest.mark.parametrize("zero", [(), ("N",), ("D", "P")], ids=lambda z: "-".join(z) or "none")
@pytest.mark.parametrize("entry", VALUE_CHECKING_ENTRIES)
def test_an_empty_level_is_an_error_naming_spatial_shapes(entry, zero, shapes, S, message):
    sizes = dict(N=2, Lq=3, M=2, D=4, P=2)
    sizes.update({dim: 0 for dim in zero})
    N, Lq, M, D, P = (sizes[d] for d in DIMS)
    spatial_shapes, level_start_index = level_tables(shapes)
    L = len(shapes)
    inputs = (torch.rand(N, S, M, D), spatial_shapes, level_start_index, torch.rand(N, Lq, M, L, P, 2),
              torch.rand(N, Lq, M, L, P))
    pattern = re.escape(f"spatial_shapes must describe value's S = {S} rows") + ".*" + re.escape(message)
    with pytest.raises(ValueError, match=pattern):
        _call(entry, inputs, torch.rand(N, Lq, M * D))
