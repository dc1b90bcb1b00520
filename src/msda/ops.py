"""The differentiable op: a typed wrapper over ``torch.ops.msda``, its fake
(meta) kernels and its autograd formula.

The C++ library registers two ops (csrc/msda.cpp):

* ``msda::ms_deform_attn_forward(value, spatial_shapes, level_start_index,
  sampling_locations, attention_weights) -> Tensor``
* ``msda::ms_deform_attn_backward(..., grad_output) -> (grad_value,
  grad_sampling_locations, grad_attention_weights)``

Autograd of the forward op calls the backward op; the backward op has no
derivative of its own, so double backward raises a clear error.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

from . import _extension
from . import onnx as _onnx_export
from .checks import check_grad_output, check_inputs
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn"]

FORWARD_AD_ERROR = (
    "msda.ms_deform_attn does not support forward-mode AD (jvp / torch.autograd.forward_ad); "
    "use msda.ms_deform_attn_reference if you need it"
)
DOUBLE_BACKWARD_ERROR = (
    "msda.ms_deform_attn does not support double backward (gradients of its gradients); "
    "use msda.ms_deform_attn_reference if you need them"
)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR), differentiable.

    Args:
        value: (N, S, M, D) flattened feature maps of all L levels, float64,
            float32, bfloat16 or float16.
        spatial_shapes: (L, 2) int32/int64 tensor of (H_l, W_l).
        level_start_index: (L,) int32/int64 tensor, the exclusive cumulative
            sum of H_l * W_l.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]
            (outside is allowed and contributes zero), in value's dtype or float32.
        attention_weights: (N, Lq, M, L, P), used as given (apply the softmax
            first), in value's dtype or float32.

    Returns:
        (N, Lq, M*D) tensor in value's dtype.

    On CUDA, pass ``spatial_shapes`` and ``level_start_index`` on the device:
    CPU ones are copied on every call, which CUDA graphs cannot capture.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in (value, sampling_locations, attention_weights)
    ):
        # The registered autograd formula is backward-only; without this check
        # the tangents would be dropped silently.
        raise RuntimeError(FORWARD_AD_ERROR)
    if _onnx_export.exporting():
        # ONNX has no msda kernel: both exporters trace standard operators instead (msda/onnx.py).
        return _onnx_export.export_form(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    device = value.device
    if device.type == "meta":
        # Shapes only: the registered fake kernel answers. The reference cannot
        # (its level checks read values), so without the extension this is an error.
        if not _extension.AVAILABLE:
            raise RuntimeError(
                f"msda.ms_deform_attn on meta tensors needs msda's compiled extension (its fake kernel): "
                f"{_extension.UNAVAILABLE_REASON}. {_extension.BUILD_HINT}"
            )
    elif device.type not in _extension.KERNEL_DEVICES:
        _extension.warn_fallback(device.type)
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if spatial_shapes.device != device:
        spatial_shapes = spatial_shapes.to(device)
    if level_start_index.device != device:
        level_start_index = level_start_index.to(device)
    return torch.ops.msda.ms_deform_attn_forward.default(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.msda.ms_deform_attn_backward.default(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_locations if needs[3] else None,
        grad_weights if needs[4] else None,
    )


def _fake_gradients(
    value: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a backward fake kernel returns: contiguous tensors shaped like
    the three differentiable inputs (v1 and v2 ops alike)."""
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (value, sampling_locations, attention_weights)
    )


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _setup_nothing(ctx, inputs, output) -> None:
    return None


def _register() -> None:
    forward_op = "msda::ms_deform_attn_forward"
    backward_op = "msda::ms_deform_attn_backward"

    @torch.library.register_fake(forward_op)
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        N, _, M, D = value.shape
        Lq = sampling_locations.shape[1]
        return value.new_empty((N, Lq, M * D))

    @torch.library.register_fake(backward_op)
    def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
        check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        # The Meta dispatch key wins over CPU: a meta grad_output with CPU
        # inputs lands here, and must not come back as uninitialised CPU tensors.
        check_grad_output(value, sampling_locations, grad_output)
        return _fake_gradients(value, sampling_locations, attention_weights)

    torch.library.register_autograd(forward_op, _backward, setup_context=_setup_context)
    torch.library.register_autograd(backward_op, _refuse_double_backward, setup_context=_setup_nothing)


if _extension.AVAILABLE:
    _register()
