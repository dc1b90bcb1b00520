"""Edge cases of the v2 op (spec §2 and issue 13's decisions): errors naming
the argument, zero sizes, locations outside the map, non-finite locations in
both methods, 1-pixel levels, one point per level."""

from __future__ import annotations

import math

import pytest
import torch

import msda
from cases import level_tables
from cases_v2 import make_case_v2, run_op_v2

METHODS = ["default", "discrete"]


def small_case(method="default", points=(2, 1), dtype=torch.float64):
    return make_case_v2(1, 3, 2, 4, [(3, 4), (2, 2)], list(points), method, seed=1, value_dtype=dtype)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "points,match",
    [
        ([3, -1], "points_per_level must have entries >= 0, got -1 at level 1"),
        ([3], r"points_per_level must have one entry per level \(L = 2\), got 1 entries"),
        ([2, 2], r"points_per_level must sum to the point dimension of sampling_locations \(3\), got sum 4"),
    ],
)
@pytest.mark.parametrize("entry", ["python", "torch.ops"])
def test_bad_points_per_level(points, match, entry):
    case = small_case()
    if entry == "python":
        with pytest.raises(ValueError, match=match):
            msda.ms_deform_attn_v2(*case.inputs, points)
    else:  # the C++ checks, for direct callers of the registered op
        with pytest.raises((ValueError, RuntimeError), match=match):
            torch.ops.msda.ms_deform_attn_v2_forward(*case.inputs, points, "default")


def test_bad_method_and_types():
    case = small_case()
    with pytest.raises(ValueError, match='method must be "default" or "discrete", got \'nearest\''):
        msda.ms_deform_attn_v2(*case.inputs, case.points, "nearest")
    with pytest.raises(ValueError, match='method must be "default" or "discrete", got "nearest"'):
        torch.ops.msda.ms_deform_attn_v2_forward(*case.inputs, case.points, "nearest")
    with pytest.raises(TypeError, match="points_per_level must be a list or tuple of ints, got Tensor"):
        msda.ms_deform_attn_v2(*case.inputs, torch.tensor(case.points))
    with pytest.raises(TypeError, match="points_per_level must hold ints, got float at level 0"):
        msda.ms_deform_attn_v2(*case.inputs, [2.0, 1])


def test_bad_shapes_name_the_argument():
    case = small_case()
    value, shapes, starts, loc, attn = case.inputs
    with pytest.raises(ValueError, match=r"sampling_locations must have shape \(N, Lq, M, sum\(points_per_level\), 2\) "
                                         r"\(5 dimensions\), got \(1, 3, 2, 1, 3, 2\)"):
        msda.ms_deform_attn_v2(value, shapes, starts, loc.unsqueeze(3), attn, case.points)
    with pytest.raises(ValueError, match=r"attention_weights must have shape \(N, Lq, M, sum\(points_per_level\)\) = "
                                         r"\(1, 3, 2, 3\), got \(1, 3, 1, 3\)"):
        msda.ms_deform_attn_v2(value, shapes, starts, loc, attn[:, :, :1], case.points)
    with pytest.raises(ValueError, match="value must have dtype float64, float32, bfloat16 or float16"):
        msda.ms_deform_attn_v2(value.long(), shapes, starts, loc, attn, case.points)
    with pytest.raises((ValueError, RuntimeError), match="level_start_index must be the exclusive cumulative sum"):
        msda.ms_deform_attn_v2(value, shapes, starts + 1, loc, attn, case.points, "discrete")


@pytest.mark.parametrize("method", METHODS)
def test_zero_levels_and_empty_maps_are_errors(method):
    value = torch.rand(1, 4, 2, 3, dtype=torch.float64)
    loc = torch.rand(1, 2, 2, 0, 2, dtype=torch.float64)
    attn = torch.rand(1, 2, 2, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"spatial_shapes must describe at least one level \(L >= 1\)"):
        msda.ms_deform_attn_v2(value, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                               loc, attn, [], method)
    shapes, starts = level_tables([(0, 4), (2, 2)])
    with pytest.raises((ValueError, RuntimeError), match="spatial_shapes must describe value's S = 4 rows"):
        msda.ms_deform_attn_v2(value, shapes, starts, loc, attn, [0, 0], method)


# ---------------------------------------------------------------- zero sizes

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "N,Lq,M,D,points",
    [(0, 3, 2, 4, [2, 1]), (1, 0, 2, 4, [2, 1]), (1, 3, 0, 4, [2, 1]), (1, 3, 2, 0, [2, 1]),
     (1, 3, 2, 4, [0, 0]), (1, 3, 2, 4, [0, 2])],
)
def test_zero_sizes(method, N, Lq, M, D, points):
    shapes, starts = level_tables([(3, 4), (2, 2)])
    T = sum(points)
    value = torch.rand(N, 16, M, D, dtype=torch.float64, requires_grad=True)
    loc = torch.rand(N, Lq, M, T, 2, dtype=torch.float64, requires_grad=True)
    attn = torch.rand(N, Lq, M, T, dtype=torch.float64, requires_grad=True)
    out = msda.ms_deform_attn_v2(value, shapes, starts, loc, attn, points, method)
    assert out.shape == (N, Lq, M * D)
    if T == 0:
        assert bool((out == 0).all())  # a sum over no points
    out.sum().backward()
    for t in (value, loc, attn):
        assert t.grad is not None and t.grad.shape == t.shape
        if T == 0 or t is loc and method == "discrete":
            assert bool((t.grad == 0).all())
    want = msda.ms_deform_attn_v2_reference(value, shapes, starts, loc, attn, points, method)
    assert torch.equal(out, want) or torch.allclose(out, want)


# ---------------------------------------------------------------- discrete rules

def one_point(method, x, y, W=4, H=3, dtype=torch.float32, weight=1.0):
    """Value pixel (r) = r + 1 on a single-level (H, W) map; one point at (x, y)."""
    shapes, starts = level_tables([(H, W)])
    value = (torch.arange(H * W, dtype=dtype) + 1).view(1, H * W, 1, 1).requires_grad_()
    loc = torch.tensor([x, y], dtype=dtype).view(1, 1, 1, 1, 2).requires_grad_()
    attn = torch.full((1, 1, 1, 1), weight, dtype=dtype).requires_grad_()
    out = msda.ms_deform_attn_v2(value, shapes, starts, loc, attn, [1], method)
    out.sum().backward()
    return out.item(), value, loc, attn


@pytest.mark.parametrize(
    "x,y,pixel",
    [
        (0.0, 0.0, (0, 0)),
        (0.3, 0.5, (1, 2)),  # trunc(1.2 + 0.5) = 1, trunc(1.5 + 0.5) = 2
        (0.99, 0.99, (3, 2)),  # trunc(3.96 + 0.5) = 4 clamps to W - 1 = 3
        (-0.5, 0.2, (0, 1)),  # left of the map: the border pixel, not zero
        (1.7, -3.0, (3, 0)),
        (1e30, -1e30, (3, 0)),  # huge: clamps to the border
        (math.inf, -math.inf, (3, 0)),  # inf: the border, like any far point
        (-math.inf, math.inf, (0, 2)),
    ],
)
def test_discrete_reads_the_clamped_pixel(x, y, pixel):
    out, value, loc, attn = one_point("discrete", x, y, weight=0.5)
    px, py = pixel
    r = py * 4 + px
    assert out == 0.5 * (r + 1)
    grad_value = torch.zeros(12)
    grad_value[r] = 0.5
    assert torch.equal(value.grad.flatten(), grad_value)
    assert attn.grad.item() == r + 1
    assert bool((loc.grad == 0).all())


@pytest.mark.parametrize("weight", [0.5, math.nan, math.inf])
@pytest.mark.parametrize("xy", [(math.nan, 0.5), (0.5, math.nan), (math.nan, math.nan)])
def test_discrete_nan_contributes_zero(weight, xy):
    out, value, loc, attn = one_point("discrete", *xy, weight=weight)
    assert out == 0.0
    for t in (value, loc, attn):
        assert bool((t.grad == 0).all())


@pytest.mark.parametrize("xy", [(math.nan, 0.5), (math.inf, 0.5), (-math.inf, 0.5), (1e30, 0.5), (-1e30, 0.5), (1.5, 0.5)])
def test_default_non_finite_and_far_contribute_zero(xy):
    out, value, loc, attn = one_point("default", *xy, weight=0.5)
    assert out == 0.0
    for t in (value, loc, attn):
        assert bool((t.grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_discrete_index_in_float32_for_16_bit_locations(dtype):
    # 0.3 rounds to 0.2998 in float16 (0.30078 in bfloat16); times W = 5 the
    # float32 index arithmetic gives trunc(1.499 + 0.5) = 1 (bfloat16: 2);
    # the kernel must agree with the reference's float32 arithmetic.
    loc_value = torch.tensor(0.3, dtype=dtype)
    want = int(torch.trunc(loc_value.float() * 5 + 0.5))
    out, *_ = one_point("discrete", float(loc_value), 0.0, W=5, H=1, dtype=dtype)
    assert out == want + 1


def product_rounding_cases(max_side: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 locations next to the .5 boundaries of maps 1..max_side wide,
    and each one's side: trunc(loc * W + 0.5) differs there between the
    product rounded first (msda's rule) and a fused multiply-add."""
    sides = torch.arange(1, max_side + 1)
    pixel = torch.cat([torch.arange(1, w + 1) for w in sides.tolist()])
    side = torch.repeat_interleave(sides, sides)
    boundary = ((pixel - 0.5) / side).float()  # (k - 0.5) / W in float32
    # The float32 numbers up to 16 ulps either side of each boundary.
    steps = torch.arange(-16, 17, dtype=torch.int32)
    loc = (boundary.view(torch.int32)[:, None] + steps).view(torch.float32).flatten()
    side = side.repeat_interleave(len(steps))
    return loc, side


def test_discrete_index_rounds_the_product_before_adding_half():
    loc, side = product_rounding_cases()
    separate = torch.trunc(loc * side.float() + 0.5)  # two float32 roundings (eager ops never fuse)
    fused = torch.trunc((loc.double() * side + 0.5).float())  # the exact product: what an FMA computes
    differ = separate != fused
    assert int(differ.sum()) >= 20  # the cases exist, or this test could not fail
    loc, side = loc[differ], side[differ]
    want = separate[differ].long().clamp(max=side - 1)
    for axis in (0, 1):  # x on a 1-row map, y on a 1-column map
        for w, x, expect in zip(side.tolist(), loc.tolist(), want.tolist()):
            shape = (1, w) if axis == 0 else (w, 1)
            xy = (x, 0.5) if axis == 0 else (0.5, x)
            value = torch.arange(1, w + 1, dtype=torch.float32).view(1, w, 1, 1)
            out = msda.ms_deform_attn_v2(
                value, torch.tensor([shape]), torch.tensor([0]), torch.tensor(xy).view(1, 1, 1, 1, 2),
                torch.ones(1, 1, 1, 1), [1], "discrete")
            assert out.item() == expect + 1, (shape, x)


@pytest.mark.parametrize("method", METHODS)
def test_one_pixel_levels_and_one_point(method):
    case = make_case_v2(2, 7, 3, 5, [(1, 1), (1, 3), (2, 1)], [1, 1, 1], method, seed=2)
    from cases_v2 import check_against_truth_v2

    check_against_truth_v2(case, *run_op_v2(msda.ms_deform_attn_v2, case))
    case = make_case_v2(2, 7, 3, 5, [(1, 1), (1, 3), (2, 1)], [1, 3, 2], method, seed=3)
    check_against_truth_v2(case, *run_op_v2(msda.ms_deform_attn_v2, case))


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_and_mixed_index_dtypes(method):
    case = make_case_v2(2, 6, 3, 8, [(4, 5), (2, 3)], [3, 2], method, seed=4)
    value = case.value.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    loc = case.sampling_locations.transpose(1, 2).contiguous().transpose(1, 2)
    out = msda.ms_deform_attn_v2(value, case.spatial_shapes.int(), case.level_start_index, loc,
                                 case.attention_weights, tuple(case.points), method)
    want = msda.ms_deform_attn_v2_reference(*case.args)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_backward_op_checks_grad_output():
    case = small_case()
    with pytest.raises(ValueError, match=r"grad_output must have shape \(N, Lq, M\*D\) = \(1, 3, 8\), got \(1, 3, 7\)"):
        torch.ops.msda.ms_deform_attn_v2_backward(*case.args, case.grad_output[..., :7])


@pytest.mark.parametrize("method", METHODS)
def test_meta_tensors_get_shapes_from_the_fake_kernel(method):
    case = small_case(method, points=(3, 0))
    args = [t.to("meta") if t.is_floating_point() else t for t in case.inputs]
    out = msda.ms_deform_attn_v2(*args, case.points, method)
    assert out.device.type == "meta" and out.shape == (1, 3, 8)


# ---------------------------------------------------------------- unsupported modes, fallback

@pytest.mark.parametrize("method", METHODS)
def test_double_backward_and_forward_ad_are_clear_errors(method):
    case = small_case(method, points=(3, 0))
    value = case.value.detach().clone().requires_grad_()
    out = msda.ms_deform_attn_v2(value, *case.inputs[1:], case.points, method)
    (grad,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(case.value, torch.ones_like(case.value))
        with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
            msda.ms_deform_attn_v2(dual, *case.inputs[1:], case.points, method)


@pytest.mark.parametrize("method", METHODS)
def test_fallback_runs_the_reference_with_a_warning(method, monkeypatch):
    from msda import _extension, ops_v2

    monkeypatch.setattr(ops_v2, "V2_KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(_extension, "_warned", set())
    monkeypatch.delenv(_extension.REQUIRE_ENV, raising=False)
    case = small_case(method, points=(3, 0))
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        out = msda.ms_deform_attn_v2(*case.args)
    assert torch.equal(out, msda.ms_deform_attn_v2_reference(*case.args))
