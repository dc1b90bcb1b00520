"""Edge cases of spec §2: far and non-finite locations, empty problems, 1-pixel
maps, exact pixel centres, non-contiguous inputs, wrong level tables."""

from __future__ import annotations

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
