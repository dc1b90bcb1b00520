"""Checks of the v2 op's arguments (points per level, method), shared by the
public op, its fake kernel and its reference.

Metadata only, so safe inside ``torch.compile(fullgraph=True)``. The
v2-specific parts are checked here; value, the level tables, dtypes and
devices by the parts of v1's :func:`check_inputs` that check them, in the
same order and wording (the C++ side, csrc/v2_checks.h, runs v1's checks on
views with a level dimension added: the same messages, since v1's shape
checks of those views cannot fail after the v2 ones). Building those views
here cost half of this check's time, which every call pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_dtypes_and_devices, check_value_and_levels

__all__ = ["METHODS", "check_inputs_v2", "check_points_per_level"]

METHODS = ("default", "discrete")


def check_points_per_level(points_per_level: Sequence[int]) -> list[int]:
    """points_per_level as a list of ints >= 0 (``ValueError``/``TypeError`` otherwise)."""
    if isinstance(points_per_level, torch.Tensor) or not isinstance(points_per_level, Sequence):
        raise TypeError(
            f"points_per_level must be a list or tuple of ints, got {type(points_per_level).__name__}"
        )
    points = []
    for level, count in enumerate(points_per_level):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"points_per_level must hold ints, got {type(count).__name__} at level {level}")
        if count < 0:
            raise ValueError(f"points_per_level must have entries >= 0, got {count} at level {level}")
        points.append(count)
    return points


def check_inputs_v2(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: Sequence[int],
    method: str,
) -> list[int]:
    """Raise naming the argument, the expectation and the actual input; return the points per level."""
    if method not in METHODS:
        raise ValueError(f'method must be "default" or "discrete", got {method!r}')
    points = check_points_per_level(points_per_level)
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, arg in zip(names, args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(arg).__name__}")
    if sampling_locations.dim() != 5:
        raise ValueError(
            "sampling_locations must have shape (N, Lq, M, sum(points_per_level), 2) (5 dimensions), "
            f"got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 4:
        raise ValueError(
            "attention_weights must have shape (N, Lq, M, sum(points_per_level)) (4 dimensions), "
            f"got {tuple(attention_weights.shape)}"
        )
    total = sum(points)
    if spatial_shapes.dim() == 2 and len(points) != spatial_shapes.shape[0]:
        raise ValueError(
            f"points_per_level must have one entry per level (L = {spatial_shapes.shape[0]}), "
            f"got {len(points)} entries"
        )
    if sampling_locations.shape[3] != total:
        raise ValueError(
            f"points_per_level must sum to the point dimension of sampling_locations "
            f"({sampling_locations.shape[3]}), got sum {total}"
        )
    if value.dim() == 4:
        N, _, M, _ = value.shape
        Lq = sampling_locations.shape[1]
        if tuple(sampling_locations.shape) != (N, Lq, M, total, 2):
            raise ValueError(
                f"sampling_locations must have shape (N, Lq, M, sum(points_per_level), 2) = "
                f"{(N, Lq, M, total, 2)}, got {tuple(sampling_locations.shape)}"
            )
        if tuple(attention_weights.shape) != (N, Lq, M, total):
            raise ValueError(
                f"attention_weights must have shape (N, Lq, M, sum(points_per_level)) = "
                f"{(N, Lq, M, total)}, got {tuple(attention_weights.shape)}"
            )
    check_value_and_levels(value, spatial_shapes, level_start_index)
    check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return points
