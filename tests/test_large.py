"""More than 2**31 value elements are indexed correctly (64-bit offsets).

Needs about 20 GB of memory, so it runs only with MSDA_TEST_LARGE=1."""

from __future__ import annotations

import os

import pytest
import torch

import msda

pytestmark = pytest.mark.skipif(os.environ.get("MSDA_TEST_LARGE") != "1", reason="set MSDA_TEST_LARGE=1 (needs ~20 GB)")


def test_value_with_more_than_2_31_elements():
    # value (1, S, 1, D) in bfloat16 with S * D > 2**31; sample only pixels
    # near the end of the tensor, where 32-bit offsets would wrap around.
    H, W, D = 2**15, 2**12 + 64, 17
    S = H * W
    assert S * D > 2**31
    value = torch.zeros(1, S, 1, D, dtype=torch.bfloat16)
    marks = torch.arange(1, D + 1, dtype=torch.bfloat16)
    value[0, S - 1, 0] = marks  # last pixel
    value[0, S - W, 0] = 2 * marks  # first pixel of the last row
    shapes = torch.tensor([[H, W]])
    starts = torch.tensor([0])
    loc = torch.tensor([[(W - 0.5) / W, (H - 0.5) / H], [0.5 / W, (H - 0.5) / H]], dtype=torch.float32)
    loc = loc.view(1, 2, 1, 1, 1, 2)
    attn = torch.ones(1, 2, 1, 1, 1, dtype=torch.float32)
    value.requires_grad_()
    out = msda.ms_deform_attn(value, shapes, starts, loc, attn)
    assert torch.equal(out[0, 0], marks) and torch.equal(out[0, 1], 2 * marks)
    out.sum().backward()
    assert value.grad[0, S - 1, 0].eq(1).all() and value.grad[0, S - W, 0].eq(1).all()
    assert value.grad.float().sum().item() == 2 * D
