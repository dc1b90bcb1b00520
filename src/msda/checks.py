"""Shape, dtype and device checks shared by the public op, the fake kernel and
the reference.

They look at metadata only (never at tensor values), so they are safe inside
``torch.compile(fullgraph=True)``. Checks that read values (sum(H*W) == S, the
level start indices) live in the C++ kernels. The C++ side repeats
these checks with the same wording for callers of ``torch.ops.msda.*``.
"""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "check_grad_output", "check_level_values", "VALUE_DTYPES", "INDEX_DTYPES"]

VALUE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _fail(message: str) -> None:
    raise ValueError(message)


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the argument, the expectation and the actual input."""
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, arg in zip(names, args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(arg).__name__}")

    L = check_value_and_levels(value, spatial_shapes, level_start_index)
    N, _, M, _ = value.shape
    if sampling_locations.dim() != 6:
        _fail(
            f"sampling_locations must have shape (N, Lq, M, L, P, 2) (6 dimensions), "
            f"got {_shape(sampling_locations)}"
        )
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    expected_loc = (N, Lq, M, L, P, 2)
    if _shape(sampling_locations) != expected_loc:
        _fail(
            f"sampling_locations must have shape (N, Lq, M, L, P, 2) = {expected_loc}, "
            f"got {_shape(sampling_locations)}"
        )
    expected_attn = (N, Lq, M, L, P)
    if _shape(attention_weights) != expected_attn:
        _fail(
            f"attention_weights must have shape (N, Lq, M, L, P) = {expected_attn}, "
            f"got {_shape(attention_weights)}"
        )
    check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def check_value_and_levels(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> int:
    """The checks of value and the level tables (part of :func:`check_inputs`); returns L."""
    if value.dim() != 4:
        _fail(f"value must have shape (N, S, M, D) (4 dimensions), got {_shape(value)}")
    if value.dtype not in VALUE_DTYPES:
        _fail(f"value must have dtype float64, float32, bfloat16 or float16, got {value.dtype}")
    N, S, M, D = value.shape
    # "> 2**63 - 1", not ">= 2**63": the TorchScript ONNX exporter traces this comparison and
    # cannot hold 2**63 as a constant (int64 overflow)
    if M * D > 2**63 - 1:
        # With N or S = 0 value holds nothing whatever M and D are; the output's
        # last dimension M*D must still be a valid size (the C++ checks agree).
        _fail(f"value must have M*D (the output's last dimension) below 2**63, got (N, S, M, D) = {_shape(value)}")

    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        _fail(f"spatial_shapes must have shape (L, 2), got {_shape(spatial_shapes)}")
    if spatial_shapes.dtype not in INDEX_DTYPES:
        _fail(f"spatial_shapes must have dtype int32 or int64, got {spatial_shapes.dtype}")
    L = spatial_shapes.shape[0]
    if L < 1:
        _fail(f"spatial_shapes must describe at least one level (L >= 1), got {_shape(spatial_shapes)}")

    if level_start_index.dim() != 1 or level_start_index.shape[0] != L:
        _fail(f"level_start_index must have shape (L,) = ({L},), got {_shape(level_start_index)}")
    if level_start_index.dtype not in INDEX_DTYPES:
        _fail(f"level_start_index must have dtype int32 or int64, got {level_start_index.dtype}")
    return L


def check_dtypes_and_devices(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """The dtypes of the locations and weights and the devices of all inputs (the last part of
    :func:`check_inputs`, after the shapes)."""
    for name, arg in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if arg.dtype != value.dtype and arg.dtype != torch.float32:
            _fail(f"{name} must have the dtype of value ({value.dtype}) or torch.float32, got {arg.dtype}")

    device = value.device
    for name, arg in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if arg.device != device:
            _fail(f"{name} must be on the device of value ({device}), got {arg.device}")
    for name, arg in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        # CPU index tensors are accepted with a CUDA value (the op moves them).
        if arg.device != device and arg.device.type != "cpu":
            _fail(f"{name} must be on the device of value ({device}) or on the CPU, got {arg.device}")


def check_grad_output(value: torch.Tensor, sampling_locations: torch.Tensor, grad_output: torch.Tensor) -> None:
    """The backward op's check of grad_output (after check_inputs): a tensor of
    shape (N, Lq, M*D), floating point, on value's device (wording as in C++)."""
    if not isinstance(grad_output, torch.Tensor):
        raise TypeError(f"grad_output must be a torch.Tensor, got {type(grad_output).__name__}")
    N, _, M, D = value.shape
    expected = (N, sampling_locations.shape[1], M * D)
    if _shape(grad_output) != expected:
        _fail(f"grad_output must have shape (N, Lq, M*D) = {expected}, got {_shape(grad_output)}")
    if not grad_output.dtype.is_floating_point:
        _fail(f"grad_output must be a floating-point tensor, got {grad_output.dtype}")
    if grad_output.device != value.device:
        _fail(f"grad_output must be on the device of value ({value.device}), got {grad_output.device}")


def check_level_values(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> None:
    """The value checks of the C++ kernels (csrc/checks.h), for the reference:
    every H, W >= 1, sum(H*W) == S, level_start_index the exclusive cumsum.
    Reads tensor values, so it is only called outside compiled graphs."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    total = 0
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        if not (1 <= h <= S and 1 <= w <= S and h * w <= S - total):
            _fail(
                f"spatial_shapes must describe value's S = {S} rows (sum of H*W with H, W >= 1), "
                f"got (H, W) = ({h}, {w}) at level {level} after {total} rows of earlier levels"
            )
        if start != total:
            _fail(
                f"level_start_index must be the exclusive cumulative sum of H*W: expected {total} "
                f"at level {level}, got {start}"
            )
        total += h * w
    if total != S:
        _fail(f"spatial_shapes must describe value's S = {S} rows, but sum of H*W is {total}")
