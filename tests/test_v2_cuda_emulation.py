"""The v2 op's CUDA code (csrc/cuda/v2_launch.h, v2_discrete_kernels.cuh and,
for method="default", v1's kernels on per-point level tables) executed on the
CPU by the CUDA emulation of tests/cuda_emulation, against float64, in both
methods and every dtype combination."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings

import msda
from cases import deterministic_algorithms
from cases_v2 import check_against_truth_v2, make_case_v2
from emulation import run_deterministic
from test_cuda_emulation import misaligned_copy, off_the_sampling_boundary
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


# ---------------------------------------------------------------- the proofs v1's kernels have
# (tests/test_cuda_emulation.py), for the v2 launches: checked device copies
# (out-of-bounds accesses name the tensor), junk-filled allocations, atomic
# counts, capped grids, misalignment, invalid level tables, non-finite points.

def replaced(case, **changes):
    return dataclasses.replace(case, **changes)


@pytest.fixture
def capped_grid(emu):
    yield emu.set_grid_cap
    emu.set_grid_cap(2**31 - 1)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("cap", [1, 3])
@pytest.mark.parametrize("D,dtype", [(8, torch.float32), (3, torch.float64), (40, torch.float16)])
def test_capped_grid_runs_grid_stride_rounds(emu, capped_grid, method, cap, D, dtype):
    case = make_case_v2(2, 40, 3, D, [(5, 4), (2, 3)], [3, 1], method, seed=cap, value_dtype=dtype)
    capped_grid(cap)
    before = emu.stats()
    out, grads = run_emulated(emu, case)
    assert emu.stats()["blocks"] - before["blocks"] <= 2 * cap  # forward + backward, at most `cap` blocks each
    check_against_truth_v2(case, out, grads)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("which", ["value", "grad_output", "sampling_locations", "attention_weights"])
@pytest.mark.parametrize("D,dtype", [(16, torch.float32), (16, torch.float16), (8, torch.bfloat16), (4, torch.float64)])
def test_each_input_misaligned(emu, method, which, D, dtype):
    # D is a multiple of the vector, so only alignment can rule the vectors out.
    other = torch.float32 if dtype != torch.float64 else dtype
    case = make_case_v2(2, 4, 2, D, [(4, 4), (2, 3)], [2, 3], method, seed=D, value_dtype=dtype, loc_dtype=other,
                        attn_dtype=other)
    case = replaced(case, **{which: misaligned_copy(getattr(case, which))})
    check_against_truth_v2(case, *run_emulated(emu, case))


# Level tables no host code checks (on the GPU they are device memory): a
# level outside value is skipped, and nothing outside value is read (the
# checked device copies would name the tensor).
BAD_TABLES = [
    ([[4, 4], [2, 2]], [0, 1000]),  # level 1 starts past the end
    ([[4, 4], [3, 3]], [0, 16]),  # level 1 runs past the end
    ([[4, 4], [2**40, 2**40]], [0, 16]),  # H*W overflows int64
    ([[4, 4], [-2, 2]], [0, 16]),
    ([[4, 4], [2, 2]], [0, -5]),
    ([[0, 4], [2, 2]], [0, 16]),  # an empty level 0
]


def points_on_valid_levels(shapes, starts, points, S):
    valid = [h >= 1 and w >= 1 and 0 <= s and s + h * w <= S for (h, w), s in zip(shapes, starts)]
    return torch.tensor([v for v, count in zip(valid, points) for _ in range(count)])


# (The discrete backward has no deterministic mode: test_discrete_backward_refuses_deterministic_mode.)
@pytest.mark.parametrize("method,deterministic", [("default", False), ("discrete", False), ("default", True)])
@pytest.mark.parametrize("shapes,starts", BAD_TABLES)
def test_wrong_level_tables_skip_the_level(emu, method, shapes, starts, deterministic):
    good = make_case_v2(2, 4, 2, 4, [(4, 4), (2, 2)], [2, 3], method, seed=4, value_dtype=torch.float32)
    bad = replaced(good, spatial_shapes=torch.tensor(shapes), level_start_index=torch.tensor(starts))
    used = points_on_valid_levels(shapes, starts, good.points, 20)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, (grad_value, grad_loc, grad_attn) = run_emulated(emu, bad)
        want_out, (want_value, want_loc, _) = run_emulated(
            emu, replaced(good, attention_weights=good.attention_weights * used))
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_value, want_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_loc[..., used, :], want_loc[..., used, :], rtol=1e-6, atol=1e-6)
    assert bool((grad_loc[..., ~used, :] == 0).all()) and bool((grad_attn[..., ~used] == 0).all())
    assert bool(torch.isfinite(grad_attn).all())


# A non-finite or huge value in one coordinate, x and y apart, the other
# coordinate inside the map. default: the point is outside the sampling
# window, so it adds nothing and gets zero gradients. discrete: NaN reads
# nothing; +-inf and +-1e30 read the border pixel. Every output and gradient
# is compared, at the hit points and the points nobody reads.
@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("axis", [0, 1], ids=["x", "y"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30, -1e30])
def test_non_finite_and_far_in_either_coordinate(emu, method, axis, bad):
    case = make_case_v2(2, 6, 2, 5, [(4, 3), (2, 2)], [3, 2], method, seed=0, value_dtype=torch.float32)
    hit = torch.zeros(case.attention_weights.shape, dtype=torch.bool)
    hit[0, 1, 0, 2] = hit[1, 4, 1, 0] = hit[1, 5, 0, 4] = True
    loc = case.sampling_locations.clone()
    point = torch.tensor([0.5, 0.5])
    point[axis] = bad
    loc[hit] = point
    out, (grad_value, grad_loc, grad_attn) = run_emulated(emu, replaced(case, sampling_locations=loc))
    for name, t in (("output", out), ("grad_value", grad_value), ("grad_sampling_locations", grad_loc),
                    ("grad_attention_weights", grad_attn)):
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    if method == "discrete" and not math.isnan(bad):
        check_against_truth_v2(replaced(case, sampling_locations=loc), out, (grad_value, grad_loc, grad_attn))
        return
    want_out, (want_value, want_loc, want_attn) = run_emulated(
        emu, replaced(case, attention_weights=case.attention_weights.masked_fill(hit, 0)))
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_value, want_value, rtol=1e-6, atol=1e-6)
    assert bool((grad_loc[hit] == 0).all()) and bool((grad_attn[hit] == 0).all())
    torch.testing.assert_close(grad_loc[~hit], want_loc[~hit], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_attn[~hit], want_attn[~hit], rtol=1e-6, atol=1e-6)


# Each point that reads a pixel adds D channels to grad_value with one
# atomicAdd each: a plain `+=` (a race on a GPU) changes the count.
@pytest.mark.parametrize("D,dtype", [(4, torch.float32), (3, torch.float64), (72, torch.float16)])
def test_discrete_atomics_one_per_read_point_and_channel(emu, D, dtype):
    case = make_case_v2(2, 7, 2, D, [(5, 4), (2, 3), (1, 1)], [3, 1, 2], "discrete", seed=D, value_dtype=dtype)
    loc = case.sampling_locations.clone()
    loc[0, :3, 1, 1, 0] = math.nan  # points that read nothing
    case = replaced(case, sampling_locations=loc)
    read = int((~torch.isnan(loc).any(-1)).sum())
    before = emu.stats()["atomics"]
    emu.backward(*case.args, case.grad_output)
    assert emu.stats()["atomics"] - before == read * D > 0


# Deterministic mode reaches the v2 default method through v1's
# deterministic backward on the per-point tables: no atomics, float64 truth.
@pytest.mark.parametrize("D,dtype,points", [(4, torch.float32, [3, 0, 2]), (8, torch.float16, [1, 4, 2]),
                                            (33, torch.float64, [2, 2, 1]), (132, torch.float32, [5, 1, 3])])
def test_deterministic_default_method_matches_float64_truth(emu, D, dtype, points):
    case = make_case_v2(2, 9, 2, D, [(4, 5), (2, 3), (1, 2)], points, "default", seed=D, value_dtype=dtype)
    case = without_window_edges(case)
    out, grads, atomics = run_deterministic(emu, case.args, case.grad_output)
    assert atomics == 0
    check_against_truth_v2(case, out, grads)


def test_discrete_backward_refuses_deterministic_mode(emu):
    case = make_case_v2(1, 3, 2, 4, [(3, 4), (2, 2)], [2, 1], "discrete", seed=1, value_dtype=torch.float32)
    with deterministic_algorithms():
        emu.forward(*case.args)  # the forward is deterministic
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            emu.backward(*case.args, case.grad_output)


# ---------------------------------------------------------------- discrete index boundaries
# loc * size + 0.5 exactly on a pixel boundary picks the pixel above it; exactly
# size (loc 0.5 on a one-pixel map, loc 1 - 0.5/size) clamps to the last pixel.

def pixel_readout(emu, sides, locs, axis):
    """Emulated discrete forward of one point per query, query i reading
    locs[i] along `axis` of a one-row (x) or one-column (y) map sides[i]
    pixels long whose pixel k holds k + 1: returns the pixels read (-1: none)."""
    sides_u = sorted(set(sides))
    shapes = [(1, w) if axis == 0 else (w, 1) for w in sides_u]
    starts = [0]
    for w in sides_u[:-1]:
        starts.append(starts[-1] + w)
    value = torch.cat([torch.arange(1, w + 1, dtype=torch.float32) for w in sides_u]).view(1, -1, 1, 1)
    points = [sides.count(w) for w in sides_u]
    order = sorted(range(len(sides)), key=lambda i: sides[i])  # points grouped by level
    T = len(sides)
    loc = torch.full((1, T, 1, T, 2), 0.5, dtype=torch.float32)
    attn = torch.zeros(1, T, 1, T, dtype=torch.float32)
    for t, i in enumerate(order):
        loc[0, i, 0, t, axis] = locs[i]
        attn[0, i, 0, t] = 1
    out = emu.forward(value, torch.tensor(shapes), torch.tensor(starts), loc, attn, points, "discrete")
    return [int(v) - 1 for v in out.flatten().tolist()]


@pytest.mark.parametrize("axis", [0, 1], ids=["x", "y"])
def test_discrete_exact_pixel_boundaries_and_the_clamp(emu, axis):
    sides, locs, want = [], [], []
    for w in (1, 2, 4, 8, 16):  # powers of two: (k - 0.5) / w is exact in float32
        for k in range(0, w + 1):
            sides.append(w)
            locs.append((k - 0.5) / w)  # loc * w + 0.5 == k exactly
            assert float(torch.tensor(locs[-1], dtype=torch.float32)) * w + 0.5 == k
            want.append(min(max(k, 0), w - 1))
        sides += [w, w]
        locs += [1.0, 0.5 / w + 1.0]  # loc * w + 0.5 = w + 0.5 and w + 1: past the end, clamped
        want += [w - 1, w - 1]
    sides.append(1)
    locs.append(0.5)  # loc * size + 0.5 == size on a one-pixel map
    want.append(0)
    assert pixel_readout(emu, sides, locs, axis) == want


@pytest.mark.parametrize("axis", [0, 1], ids=["x", "y"])
def test_discrete_index_rounds_the_product_before_adding_half(emu, axis):
    # Locations where a fused multiply-add would pick the neighbouring pixel
    # (tests/test_v2_edge_cases.py finds them): the emulated CUDA kernels pick
    # the separately rounded one. Under MSDA_EMULATION_BUILD=ubsan-fma the
    # compiler may contract every product into an FMA, as nvcc does.
    from test_v2_edge_cases import product_rounding_cases

    loc, side = product_rounding_cases()
    separate = torch.trunc(loc * side.float() + 0.5)
    fused = torch.trunc((loc.double() * side + 0.5).float())
    differ = separate != fused
    assert int(differ.sum()) >= 20  # the cases exist, or this test could not fail
    loc, side = loc[differ], side[differ]
    want = separate[differ].long().clamp(max=side - 1).clamp(min=0).tolist()
    assert [emu.discrete_index(x, w) for x, w in zip(loc.tolist(), side.tolist())] == want
    assert pixel_readout(emu, side.tolist(), loc.tolist(), axis) == want


def test_the_contracting_build_contracts(emu):
    # Without this, the FMA build could silently not contract and the test
    # above would prove nothing there: a * b + c must be one fused rounding.
    if not emu.contracting_build:
        pytest.skip("plain build (MSDA_EMULATION_BUILD=ubsan-fma builds the contracting one)")
    a = 1 + 2.0**-12  # a * a = 1 + 2**-11 + 2**-24 exactly; rounded to float32 first, 1 + 2**-11
    assert emu.multiply_add(a, a, -(1 + 2.0**-11)) == 2.0**-24


# ---------------------------------------------------------------- more than 2**31 value elements
LARGE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from build import load_emulation
    emu = load_emulation(entry="emulated_ops_v2.cpp")
    H, W, D, method = 2**15, 2**12, 17, sys.argv[2]
    S = H * W
    value = torch.empty(2, S, 1, D, dtype=torch.bfloat16)  # untouched pages: no memory
    marks = torch.arange(1, D + 1, dtype=torch.bfloat16)
    pixels = [(0, 0, 0), (S - W, 0, H - 1), (S - 1, W - 1, H - 1)]  # (row, x, y)
    for n in range(2):
        for i, (row, _, _) in enumerate(pixels):
            value[n, row, 0] = marks * (3 * n + i + 1)
    # default samples pixel centres, discrete reads trunc(loc * size + 0.5): exact in float32.
    shift = 0.5 if method == "default" else 0.0
    loc = torch.tensor([[(x + shift) / W, (y + shift) / H] for _, x, y in pixels], dtype=torch.float32)
    loc = loc.view(1, 3, 1, 1, 2).expand(2, 3, 1, 1, 2).contiguous()
    attn = torch.ones(2, 3, 1, 1, dtype=torch.float32)
    out = emu.forward(value, torch.tensor([[H, W]]), torch.tensor([0]), loc, attn, [1], method)
    want = torch.stack([torch.stack([marks * (3 * n + i + 1) for i in range(3)]) for n in range(2)])
    print(json.dumps({"exact": bool(torch.equal(out, want)),
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_forward_with_more_than_2_31_elements(method):
    # As tests/test_large.py for v1: both the batch offset and the last rows'
    # offsets pass 2**31, so any 32-bit truncation reads the wrong row.
    from test_large import MAX_RSS_MB, VALUE_BYTES

    limit = VALUE_BYTES + (6 << 30)

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", LARGE_SCRIPT, os.path.join(here, "cuda_emulation"), method],
                          capture_output=True, text=True, preexec_fn=cap, timeout=1800, cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["exact"]
    assert result["max_rss_mb"] < MAX_RSS_MB, f"peak resident memory {result['max_rss_mb']:.0f} MB"
