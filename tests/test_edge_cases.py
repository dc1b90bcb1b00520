"""Edge cases of spec §2: far and non-finite locations, empty problems, 1-pixel
maps, exact pixel centres, non-contiguous inputs, wrong level tables."""

from __future__ import annotations

import re

import pytest
import torch

import msda
from cases import check_against_truth, level_tables, make_case, run_op

OPS = {"kernel": msda.ms_deform_attn, "reference": msda.ms_deform_attn_reference}


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30])
def test_far_and_non_finite_locations_contribute_nothing(op, dtype, bad):
    case = make_case(N=2, Lq=6, M=2, D=5, shapes=[(4, 3), (2, 2)], P=3, seed=0, value_dtype=dtype)
    loc = case.sampling_locations.detach().clone()
    hit = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    hit[0, 1, 0, 1, 2] = True
    hit[1, 4, 1, 0, 0] = True
    loc[hit] = torch.tensor([bad, 0.5], dtype=dtype)
    loc[1, 2, 0, 0, 1] = torch.tensor([0.5, bad], dtype=dtype)
    hit[1, 2, 0, 0, 1] = True
    value = case.value.detach().requires_grad_()
    loc.requires_grad_()
    attn = case.attention_weights.detach().requires_grad_()
    out = op(value, case.spatial_shapes, case.level_start_index, loc, attn)
    out.backward(case.grad_output)
    # Same as giving those points zero attention.
    zero_attn = case.attention_weights.detach().clone()
    zero_attn[hit] = 0
    want = msda.ms_deform_attn_reference(case.value, case.spatial_shapes, case.level_start_index,
                                         case.sampling_locations.masked_fill(hit[..., None], 0.5), zero_attn)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(loc.grad).all() and torch.isfinite(attn.grad).all() and torch.isfinite(value.grad).all()
    assert (loc.grad[hit] == 0).all()
    assert (attn.grad[hit] == 0).all()


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0), (0, 0)])
@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_empty_problems(op, N, Lq):
    case = make_case(N=N, Lq=Lq, M=2, D=3, shapes=[(3, 3)], P=2, seed=0, value_dtype=torch.float32)
    out, grads = run_op(op, case)
    assert out.shape == (N, Lq, 6)
    for grad, inp in zip(grads, (case.value, case.sampling_locations, case.attention_weights)):
        assert grad.shape == inp.shape and grad.dtype == inp.dtype
        assert (grad == 0).all()


@pytest.mark.parametrize("shapes", [[(1, 1)], [(1, 7)], [(7, 1)], [(1, 1), (1, 1), (2, 1)]])
def test_one_pixel_wide_maps(shapes):
    case = make_case(N=2, Lq=9, M=3, D=4, shapes=shapes, P=3, seed=5)
    out, grads = run_op(msda.ms_deform_attn, case)
    check_against_truth(case, out, grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_exact_pixel_centres_return_the_pixel(dtype):
    # At x = k, y = j (loc = ((k + 0.5) / W, (j + 0.5) / H)) the sample is the pixel itself.
    H, W, D = 4, 8, 8  # powers of two: the centres are exact in every dtype
    shapes, starts = level_tables([(H, W)])
    value = (torch.arange(H * W * D, dtype=torch.float64).reshape(1, H * W, 1, D) / 10).to(dtype)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    loc = torch.stack([(xs.double() + 0.5) / W, (ys.double() + 0.5) / H], -1).reshape(1, H * W, 1, 1, 1, 2).to(dtype)
    attn = torch.ones(1, H * W, 1, 1, 1, dtype=dtype)
    out = msda.ms_deform_attn(value, shapes, starts, loc, attn)
    assert torch.equal(out.reshape(H * W, D), value.reshape(H * W, D))


def test_non_contiguous_inputs():
    case = make_case(N=3, Lq=11, M=2, D=6, shapes=[(5, 4), (3, 2)], P=2, seed=2)
    # Build the same tensors as views with other strides.
    value = case.value.transpose(0, 1).contiguous().transpose(0, 1)
    loc = case.sampling_locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    attn = torch.stack([case.attention_weights, case.attention_weights], dim=-1)[..., 0]
    shapes = torch.stack([case.spatial_shapes, case.spatial_shapes], dim=-1)[..., 0]
    assert not value.is_contiguous() and not loc.is_contiguous() and not attn.is_contiguous()
    assert not shapes.is_contiguous()
    want = msda.ms_deform_attn(case.value, case.spatial_shapes, case.level_start_index,
                               case.sampling_locations, case.attention_weights)
    got = msda.ms_deform_attn(value, shapes, case.level_start_index, loc, attn)
    assert torch.equal(got, want)
    # and through autograd with a non-contiguous grad_output
    value.requires_grad_()
    out = msda.ms_deform_attn(value, shapes, case.level_start_index, loc.requires_grad_(), attn.requires_grad_())
    grad_output = case.grad_output.transpose(0, 1).contiguous().transpose(0, 1)
    out.backward(grad_output)
    _, grads = run_op(msda.ms_deform_attn, case)
    assert torch.equal(value.grad, grads[0]) and torch.equal(loc.grad, grads[1]) and torch.equal(attn.grad, grads[2])


@pytest.mark.parametrize(
    "shapes,starts,match",
    [
        ([[4, 3], [2, 3]], [0, 12], "spatial_shapes must describe value's S = 16"),  # sum 18 > 16
        ([[4, 3], [2, 1]], [0, 12], "spatial_shapes must describe value's S = 16 rows, but sum of H\\*W is 14"),
        ([[4, 3], [2, 2]], [0, 11], "level_start_index must be the exclusive cumulative sum"),
        ([[4, 3], [2, 2]], [0, 10**12], "level_start_index must be the exclusive cumulative sum"),
        ([[4, 3], [-2, -2]], [0, 12], "spatial_shapes must describe"),
        ([[2**40, 2**40], [2, 2]], [0, 12], "spatial_shapes must describe"),
        ([[0, 3], [2, 2]], [0, 0], "spatial_shapes must describe"),
    ],
)
@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_wrong_level_tables_raise_instead_of_reading_out_of_bounds(op, shapes, starts, match):
    case = make_case(N=1, Lq=4, M=1, D=2, shapes=[(4, 3), (2, 2)], P=2, seed=0)
    shapes_t, starts_t = torch.tensor(shapes), torch.tensor(starts)
    with pytest.raises(ValueError, match=match):
        op(case.value, shapes_t, starts_t, case.sampling_locations, case.attention_weights)


@pytest.mark.parametrize(
    "shapes,starts",
    [([[4, 3], [2, 3]], [0, 12]), ([[4, 3], [2, 2]], [0, 10**12]), ([[2**40, 2**40], [2, 2]], [0, 12])],
)
def test_backward_op_checks_level_tables_too(shapes, starts):
    case = make_case(N=1, Lq=4, M=1, D=2, shapes=[(4, 3), (2, 2)], P=2, seed=0)
    with pytest.raises(ValueError, match="spatial_shapes must describe|level_start_index must be"):
        torch.ops.msda.ms_deform_attn_backward(case.value, torch.tensor(shapes), torch.tensor(starts),
                                               case.sampling_locations, case.attention_weights, case.grad_output)


def test_any_batch_size_no_im2col_rule():
    # The original required the batch to be a multiple of im2col_step (64) past 64.
    case = make_case(N=67, Lq=2, M=1, D=2, shapes=[(2, 2)], P=1, seed=0, value_dtype=torch.float32)
    out = msda.MSDeformAttnFunction.apply(*case.inputs, 64)
    want = msda.ms_deform_attn_reference(*case.inputs)
    torch.testing.assert_close(out, want)


def test_double_backward_raises_clear_error():
    case = make_case(N=1, Lq=3, M=1, D=2, shapes=[(3, 3)], P=2, seed=0)
    value = case.value.detach().requires_grad_()
    out = msda.ms_deform_attn(value, case.spatial_shapes, case.level_start_index, case.sampling_locations,
                              case.attention_weights)
    (grad,) = torch.autograd.grad(out.sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()


def test_forward_mode_ad_raises_clear_error():
    import torch.autograd.forward_ad as fwAD

    case = make_case(N=1, Lq=3, M=1, D=2, shapes=[(3, 3)], P=2, seed=0)
    with fwAD.dual_level():
        value = fwAD.make_dual(case.value, torch.ones_like(case.value))
        with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
            msda.ms_deform_attn(value, case.spatial_shapes, case.level_start_index, case.sampling_locations,
                                case.attention_weights)


def _dirty_the_heap(numel: int) -> None:
    # Free a NaN-filled block of the size the op will allocate next, so that
    # an output the op forgets to write shows NaN instead of lucky zeros.
    junk = torch.full((numel,), float("nan"))
    del junk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_zero_channels_give_zero_gradients(op, dtype):
    # D = 0: the output is empty, so every gradient is zero; the kernel has no
    # channel blocks and runs no task, so it must zero its outputs itself.
    value = torch.zeros(1, 4, 1, 0, dtype=dtype, requires_grad=True)
    shapes, starts = level_tables([(2, 2)])
    loc = torch.rand(1, 300, 1, 1, 4, 2, dtype=dtype, requires_grad=True)
    attn = torch.rand(1, 300, 1, 1, 4, dtype=dtype, requires_grad=True)
    _dirty_the_heap(loc.numel())
    out = op(value, shapes, starts, loc, attn)
    assert out.shape == (1, 300, 0)
    out.sum().backward()
    for t in (value, loc, attn):
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        assert (t.grad == 0).all()
    if op is not msda.ms_deform_attn:
        return
    # and the raw backward op, which autograd may skip for an empty output
    _dirty_the_heap(loc.numel())
    grads = torch.ops.msda.ms_deform_attn_backward(value.detach(), shapes, starts, loc.detach(), attn.detach(),
                                                   torch.zeros(1, 300, 0, dtype=dtype))
    for grad, t in zip(grads, (value, loc, attn)):
        assert grad.shape == t.shape and (grad == 0).all()


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_level_sizes_whose_product_overflows_are_rejected_at_their_level(op):
    # H*W = 2**64 wraps to 0 in 64 bits (undefined behaviour for int64_t): the
    # check must reject the level by its own sizes before multiplying them.
    # D = 0 makes S = 2**33 rows free.
    value = torch.zeros(1, 2**33, 1, 0)
    loc, attn = torch.rand(1, 2, 1, 1, 1, 2), torch.rand(1, 2, 1, 1, 1)
    shapes, starts = torch.tensor([[2**32, 2**32]]), torch.tensor([0])
    match = re.escape("got (H, W) = (4294967296, 4294967296) at level 0")
    with pytest.raises(ValueError, match=match):
        op(value, shapes, starts, loc, attn)
    if op is msda.ms_deform_attn:
        with pytest.raises(ValueError, match=match):
            torch.ops.msda.ms_deform_attn_forward(value, shapes, starts, loc, attn)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_output_width_overflow_is_rejected(op):
    # N = 0 holds no elements whatever M and D are, but the output's M*D must
    # still be a size: 2**32 * 2**32 would wrap to 0. (Contiguous strides
    # would overflow too, so torch only builds such a value with other strides.)
    value = torch.empty_strided((0, 4, 2**32, 2**32), (1, 1, 1, 1))
    shapes, starts = level_tables([(2, 2)])
    loc, attn = torch.rand(0, 3, 2**32, 1, 1, 2), torch.rand(0, 3, 2**32, 1, 1)
    with pytest.raises(ValueError, match=re.escape("value must have M*D (the output's last dimension) below 2**63")):
        op(value, shapes, starts, loc, attn)
    if op is msda.ms_deform_attn:
        with pytest.raises(ValueError, match=re.escape("value must have M*D")):
            torch.ops.msda.ms_deform_attn_forward(value, shapes, starts, loc, attn)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_of_samples_outside_the_map_contribute_nothing(op, dtype, weight):
    # The original CUDA kernel skips samples outside -1 < x < W, -1 < y < H
    # before it reads their weight: such a sample contributes nothing, whatever
    # its weight. Inside the map a NaN weight gives NaN, as any product would.
    case = make_case(N=2, Lq=6, M=2, D=5, shapes=[(4, 3), (2, 2)], P=3, seed=3, value_dtype=dtype)
    loc = case.sampling_locations.detach().clone()
    outside = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    outside[0, 1, 0, 1, 2] = outside[1, 4, 1, 0, 0] = outside[1, 2, 0, 0, 1] = outside[0, 0, 1, 1, 0] = True
    # x = -1.25 (left), y = H + 0.25 (below), NaN, a far location
    loc[0, 1, 0, 1, 2] = torch.tensor([-0.75 / 2, 0.5])
    loc[1, 4, 1, 0, 0] = torch.tensor([0.5, 4.75 / 4])
    loc[1, 2, 0, 0, 1] = torch.tensor([float("nan"), 0.5])
    loc[0, 0, 1, 1, 0] = torch.tensor([0.5, 1e30])
    attn = case.attention_weights.detach().clone()
    zero_attn = attn.masked_fill(outside, 0)
    attn[outside] = weight
    value = case.value.detach().requires_grad_()
    loc.requires_grad_()
    attn.requires_grad_()
    out = op(value, case.spatial_shapes, case.level_start_index, loc, attn)
    out.backward(case.grad_output)
    want = op(case.value, case.spatial_shapes, case.level_start_index, loc.detach(), zero_attn)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for t in (value, loc, attn):
        assert torch.isfinite(t.grad).all()
    assert (loc.grad[outside] == 0).all() and (attn.grad[outside] == 0).all()
    # Inside the map the weight is used: NaN in, NaN out at that query and head.
    attn_inside = case.attention_weights.detach().clone()
    attn_inside[0, 3, 1, 0, 0] = float("nan")
    loc_inside = case.sampling_locations.detach().clone()
    loc_inside[0, 3, 1, 0, 0] = 0.5
    out = op(case.value, case.spatial_shapes, case.level_start_index, loc_inside, attn_inside)
    D = case.value.shape[-1]
    assert torch.isnan(out[0, 3, D : 2 * D]).all()
    assert torch.isfinite(out[0, 3, :D]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_emulated_cuda_skips_non_finite_weights_outside_the_map(weight):
    # The CUDA kernels, run on the CPU by tests/cuda_emulation, follow the same rule.
    from emulation import emulation

    emu = emulation()
    case = make_case(N=2, Lq=6, M=2, D=8, shapes=[(4, 3), (2, 2)], P=3, seed=3, value_dtype=torch.float32)
    loc = case.sampling_locations.clone()
    attn = case.attention_weights.clone()
    outside = torch.zeros(attn.shape, dtype=torch.bool)
    outside[0, 1, 0, 1, 2] = outside[1, 2, 0, 0, 1] = True
    loc[0, 1, 0, 1, 2] = torch.tensor([-0.75 / 2, 0.5])
    loc[1, 2, 0, 0, 1] = torch.tensor([float("nan"), 0.5])
    zero_attn = attn.masked_fill(outside, 0)
    attn[outside] = weight
    out = emu.forward(case.value, case.spatial_shapes, case.level_start_index, loc, attn)
    grads = emu.backward(case.value, case.spatial_shapes, case.level_start_index, loc, attn, case.grad_output)
    want = emu.forward(case.value, case.spatial_shapes, case.level_start_index, loc, zero_attn)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][outside] == 0).all() and (grads[2][outside] == 0).all()
