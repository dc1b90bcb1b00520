"""msda's v2 op against transformers' own `multi_scale_deformable_attention_v2`
(the contract of issue 13), on finite inputs, in both methods.

Differences by design (README, "RT-DETRv2 / D-FINE / DEIM"): non-finite
discrete locations (transformers' int64 conversion is platform-dependent;
msda clamps +-inf to the border and NaN contributes zero), 16-bit discrete
index arithmetic (msda: float32), and the spec's rules for non-finite default
locations. Skipped only where transformers is not installed.
"""

from __future__ import annotations

import pytest
import torch

import msda
from cases_v2 import make_case_v2

modeling = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("points", [[4, 4, 4], [3, 6, 3], [2, 0, 1]])
def test_matches_transformers(dtype, method, points):
    shapes = [(10, 12), (5, 6), (3, 3)]
    case = make_case_v2(2, 25, 4, 8, shapes, points, method, seed=sum(points), value_dtype=dtype)
    args = [t.detach().clone().requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)]
    want = modeling.multi_scale_deformable_attention_v2(args[0], shapes, args[1], args[2], points, method)
    want.backward(case.grad_output)

    got_args = [t.detach().clone().requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)]
    got = msda.ms_deform_attn_v2(
        got_args[0], case.spatial_shapes, case.level_start_index, got_args[1], got_args[2], points, method
    )
    got.backward(case.grad_output)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_args[0].grad, args[0].grad, **tol)
    torch.testing.assert_close(got_args[2].grad, args[2].grad, **tol)
    if method == "default":
        # Off the sampling window's edge, where grid_sample's one-sided gradient differs (spec §1).
        torch.testing.assert_close(got_args[1].grad, args[1].grad, rtol=1e-4 if dtype == torch.float32 else 1e-8,
                                   atol=1e-3 if dtype == torch.float32 else 1e-8)
    else:
        assert args[1].grad is None  # transformers: no gradient through the integer index
        assert bool((got_args[1].grad == 0).all())  # msda: a zero gradient
