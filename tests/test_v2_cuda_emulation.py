"""The v2 op's CUDA code (csrc/cuda/v2_launch.h, v2_discrete_kernels.cuh and,
for method="default", v1's kernels on per-point level tables) executed on the
CPU by the CUDA emulation of tests/cuda_emulation, against float64, in both
methods and every dtype combination."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings

import msda
from cases_v2 import check_against_truth_v2, make_case_v2
from test_cuda_emulation import off_the_sampling_boundary
from test_op_vs_reference import DTYPE_COMBINATIONS
from test_v2_op import problems_v2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
from build import load_emulation  # noqa: E402

# Half the v1 emulation tests' examples per dtype combination (there are two methods).
EXAMPLES = int(os.environ.get("MSDA_EMULATION_EXAMPLES", "25")) // 2 or 1


@pytest.fixture(scope="module")
def emu():
    module = load_emulation(entry="emulated_ops_v2.cpp")
    module.set_seed(int(os.environ.get("MSDA_EMULATION_SEED", "12345")))
    return module


def run_emulated(emu, case):
    out = emu.forward(*case.args)
    grads = emu.backward(*case.args, case.grad_output)
    return out, grads


def without_window_edges(case):
    """v1's emulation tests move 16-bit locations off the sampling window's edge
    (spec §1); the same here, through a one-level-per-point v1 view."""
    if case.method != "default":
        return case
    levels = torch.repeat_interleave(torch.arange(len(case.points)), torch.tensor(case.points, dtype=torch.long))
    from cases import Case

    v1 = Case(case.value, case.spatial_shapes[levels], case.level_start_index[levels],
              case.sampling_locations.unsqueeze(4), case.attention_weights.unsqueeze(4), case.grad_output)
    case.sampling_locations = off_the_sampling_boundary(v1).sampling_locations.squeeze(4)
    return case


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtypes", DTYPE_COMBINATIONS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@settings(max_examples=EXAMPLES)
@given(problem=problems_v2())
def test_emulated_cuda_matches_float64_truth(emu, method, dtypes, problem):
    value_dtype, loc_dtype, attn_dtype = dtypes
    case = make_case_v2(**problem, method=method, value_dtype=value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    case = without_window_edges(case)
    check_against_truth_v2(case, *run_emulated(emu, case))


# Each discrete launch shape: scalar and vector channels, segment widths 1..32,
# lanes looping over more groups than the segment has (D / VEC > 32).
@pytest.mark.parametrize(
    "D,dtype", [(1, torch.float32), (3, torch.float64), (8, torch.float16), (32, torch.float32),
                (72, torch.bfloat16), (300, torch.float32)],
)
def test_emulated_discrete_launch_shapes(emu, D, dtype):
    case = make_case_v2(2, 5, 3, D, [(4, 5), (2, 3), (1, 1)], [3, 6, 3], "discrete", seed=D, value_dtype=dtype)
    check_against_truth_v2(case, *run_emulated(emu, case))


def test_emulated_discrete_non_finite_and_far(emu):
    case = make_case_v2(1, 4, 2, 8, [(3, 4), (2, 2)], [2, 2], "discrete", seed=9, value_dtype=torch.float32)
    loc = case.sampling_locations.clone()
    loc[0, 0, 0, 0] = torch.tensor([math.nan, 0.5])
    loc[0, 1, 0, 1] = torch.tensor([math.inf, -math.inf])
    loc[0, 2, 1, 2] = torch.tensor([1e30, -1e30])
    case.sampling_locations = loc
    out, grads = run_emulated(emu, case)
    # NaN contributes zero; inf and huge values read the border pixel (the
    # reference's rule; the CPU kernel's sums run in another order).
    want = msda.ms_deform_attn_v2_reference(*case.args)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert bool((grads[1] == 0).all())


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_emulated_zero_points(emu, method):
    case = make_case_v2(1, 3, 2, 4, [(3, 4), (2, 2)], [0, 0], method, seed=1)
    out, grads = run_emulated(emu, case)
    assert out.shape == (1, 3, 8) and bool((out == 0).all())
    for g, t in zip(grads, (case.value, case.sampling_locations, case.attention_weights)):
        assert g.shape == t.shape and bool((g == 0).all())
