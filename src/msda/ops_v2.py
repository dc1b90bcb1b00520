"""The v2 op of RT-DETRv2, D-FINE and DEIM: points per level and discrete
sampling. A typed wrapper over ``torch.ops.msda.ms_deform_attn_v2_*``, its
fake kernels and its autograd formula.

The C++ library registers (csrc/v2_schema.cpp):

* ``msda::ms_deform_attn_v2_forward(value, spatial_shapes, level_start_index,
  sampling_locations, attention_weights, int[] points_per_level, str method) -> Tensor``
* ``msda::ms_deform_attn_v2_backward(..., method, grad_output) -> (grad_value,
  grad_sampling_locations, grad_attention_weights)``

With equal points on every level and ``method="default"`` the public function
calls v1's op (:func:`msda.ms_deform_attn`) on the same memory viewed as
(N, Lq, M, L, P, 2): the result is bitwise v1's, and v1's speed is untouched
by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad

from . import _extension
from . import onnx as _onnx_export
from .checks import check_grad_output
from .checks_v2 import check_inputs_v2
from .ops import FORWARD_AD_ERROR, _fake_gradients, _refuse_double_backward, _setup_nothing, ms_deform_attn
from .reference_v2 import ms_deform_attn_v2_reference

__all__ = ["ms_deform_attn_v2"]

_FORWARD_OP = "msda::ms_deform_attn_v2_forward"
_BACKWARD_OP = "msda::ms_deform_attn_v2_backward"


def _schema_registered() -> bool:
    return _extension.AVAILABLE and hasattr(torch.ops.msda, "ms_deform_attn_v2_forward")


def _has_v2_kernels(key: str) -> bool:
    return _schema_registered() and torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, key)


# A constant for torch.compile, like _extension.KERNEL_DEVICES.
V2_KERNEL_DEVICES: frozenset[str] = frozenset(
    device for device, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_v2_kernels(key)
)


def ms_deform_attn_v2(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: Sequence[int],
    method: str = "default",
) -> torch.Tensor:
    """Multi-scale deformable attention with its own number of points per
    level (RT-DETRv2, D-FINE, DEIM), differentiable.

    Args:
        value: (N, S, M, D) flattened feature maps of all L levels, float64,
            float32, bfloat16 or float16.
        spatial_shapes: (L, 2) int32/int64 tensor of (H_l, W_l).
        level_start_index: (L,) int32/int64 tensor, the exclusive cumulative
            sum of H_l * W_l.
        sampling_locations: (N, Lq, M, sum(points_per_level), 2) normalised
            (x, y), the points of level 0 first; in value's dtype or float32.
        attention_weights: (N, Lq, M, sum(points_per_level)), used as given;
            in value's dtype or float32.
        points_per_level: P_l for each level (ints >= 0), e.g. [4, 4, 4] or
            [3, 6, 3]; transformers calls it ``num_points_list``.
        method: ``"default"``: bilinear sampling as :func:`msda.ms_deform_attn`
            (grid_sample, zeros padding, align_corners=False).
            ``"discrete"``: each point reads the single pixel
            ``trunc(loc * (W, H) + 0.5)`` clamped into the map (a point outside
            reads the border pixel), the index computed in float32 (float64 for
            float64 locations); a NaN location contributes zero. Locations get
            a zero gradient; value and weights get theirs.

    Returns:
        (N, Lq, M*D) tensor in value's dtype.
    """
    points = check_inputs_v2(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points_per_level, method
    )
    if method == "default" and len(points) > 0 and points[0] > 0 and all(p == points[0] for p in points):
        # Uniform points: v1's op on the same memory (bitwise v1's result).
        L, P = len(points), points[0]
        return ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations.unflatten(3, (L, P)),
            attention_weights.unflatten(3, (L, P)),
        )
    if forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in (value, sampling_locations, attention_weights)
    ):
        raise RuntimeError(FORWARD_AD_ERROR)
    if _onnx_export.exporting():
        # ONNX has no msda kernel: both exporters trace standard operators instead (msda/onnx.py).
        return _onnx_export.export_form_v2(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, method
        )
    device = value.device
    if device.type == "meta":
        # Shapes only: the registered fake kernel answers (as for v1's op).
        if not _schema_registered():
            raise RuntimeError(
                f"msda.ms_deform_attn_v2 on meta tensors needs msda's compiled extension (its fake kernel): "
                f"{_extension.UNAVAILABLE_REASON}. {_extension.BUILD_HINT}"
            )
    elif device.type not in V2_KERNEL_DEVICES:
        _extension.warn_fallback(device.type)
        return ms_deform_attn_v2_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, method
        )
    if spatial_shapes.device != device:
        spatial_shapes = spatial_shapes.to(device)
    if level_start_index.device != device:
        level_start_index = level_start_index.to(device)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, method)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (value.requires_grad or sampling_locations.requires_grad
                                     or attention_weights.requires_grad)
    ):
        # Nothing to differentiate (inference): go straight to the kernel, as the
        # registered autograd kernel would, without its Python layer (a fifth of
        # this function's fixed cost). Compiled and exported graphs keep the op as is.
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.msda.ms_deform_attn_v2_forward.default(*args)
    return torch.ops.msda.ms_deform_attn_v2_forward.default(*args)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:5])
    ctx.points_per_level, ctx.method = inputs[5], inputs[6]


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.msda.ms_deform_attn_v2_backward.default(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        ctx.points_per_level,
        ctx.method,
        grad_output,
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_locations if needs[3] else None,
        grad_weights if needs[4] else None,
        None,
        None,
    )


def _register() -> None:
    @torch.library.register_fake(_FORWARD_OP)
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, method):
        check_inputs_v2(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, list(points), method
        )
        N, _, M, D = value.shape
        return value.new_empty((N, sampling_locations.shape[1], M * D))

    @torch.library.register_fake(_BACKWARD_OP)
    def _backward_fake(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, method, grad_output
    ):
        check_inputs_v2(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, list(points), method
        )
        # A meta grad_output with CPU inputs lands here (Meta wins over CPU).
        check_grad_output(value, sampling_locations, grad_output)
        return _fake_gradients(value, sampling_locations, attention_weights)

    torch.library.register_autograd(_FORWARD_OP, _backward, setup_context=_setup_context)
    torch.library.register_autograd(_BACKWARD_OP, _refuse_double_backward, setup_context=_setup_nothing)


if _schema_registered():
    _register()
