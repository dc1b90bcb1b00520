"""torch.autograd.gradcheck of the compiled op in float64, and the original
implementation's own test case (spec §6)."""

from __future__ import annotations

import pytest
import torch

import msda
from cases import level_tables, make_case


@pytest.mark.parametrize("D", [1, 2, 30, 32, 64, 71])
def test_gradcheck_float64(D):
    case = make_case(N=2, Lq=3, M=2, D=D, shapes=[(4, 5), (2, 3)], P=2, seed=D, outside_fraction=0.2)
    inputs = (
        case.value.detach().requires_grad_(),
        case.spatial_shapes,
        case.level_start_index,
        case.sampling_locations.detach().requires_grad_(),
        case.attention_weights.detach().requires_grad_(),
    )
    assert torch.autograd.gradcheck(msda.ms_deform_attn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _original_case(D: int, dtype=torch.float64):
    """The original repository's test: N=1, M=2, Lq=2, L=2, P=2, shapes (6,4),(3,2)."""
    torch.manual_seed(3)
    N, M, Lq, L, P = 1, 2, 2, 2, 2
    shapes, starts = level_tables([(6, 4), (3, 2)])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.rand(N, S, M, D, dtype=dtype) * 0.01
    loc = torch.rand(N, Lq, M, L, P, 2, dtype=dtype)
    attn = torch.rand(N, Lq, M, L, P, dtype=dtype) + 1e-5
    attn = attn / attn.sum(-1, keepdim=True).sum(-2, keepdim=True)
    return value, shapes, starts, loc, attn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_original_forward_case(dtype):
    value, shapes, starts, loc, attn = _original_case(D=2, dtype=dtype)
    got = msda.ms_deform_attn(value, shapes, starts, loc, attn)
    want = msda.ms_deform_attn_reference(value.double(), shapes, starts, loc.double(), attn.double())
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("D", [30, 32, 64, 71, 1025, 2048, 3096])
def test_original_gradcheck_case(D):
    value, shapes, starts, loc, attn = _original_case(D)
    inputs = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(msda.ms_deform_attn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=D > 100)


def test_gradcheck_through_drop_in_function():
    value, shapes, starts, loc, attn = _original_case(4)
    inputs = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_(), 64)
    assert torch.autograd.gradcheck(msda.MSDeformAttnFunction.apply, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
