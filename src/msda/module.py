"""``MSDeformAttn``: the drop-in replacement for Deformable DETR's module.

Same constructor, parameter names, initialisation and forward as the original,
so its checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Args:
        d_model: channels of queries and values; must be divisible by ``n_heads``.
        n_levels: number of feature levels L.
        n_heads: number of attention heads M.
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model} and n_heads={n_heads}")
        self.im2col_step = 64  # kept for attribute compatibility; has no effect
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head m starts looking along direction 2*pi*m/M, scaled so the larger
        # component is 1, point p at distance p + 1, the same on every level.
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, self.n_points, 1)
        bias = directions.view(self.n_heads, 1, 1, 2) * scale
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, d_model).
            reference_points: (N, Lq, L, 2) normalised points (x, y), or
                (N, Lq, L, 4) boxes (cx, cy, w, h); (0, 0) is the top-left corner.
            input_flatten: (N, S, d_model), all levels flattened and concatenated.
            input_spatial_shapes: (L, 2) of (H_l, W_l).
            input_level_start_index: (L,) start row of each level.
            input_padding_mask: optional (N, S) bool, True at padded positions.

        Returns:
            (N, Lq, d_model).
        """
        self._check_inputs(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                           input_padding_mask)
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)

        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        weights = torch.softmax(weights, dim=-1).view(N, Lq, M, L, P)

        # The locations are built on a (N, Lq, M, L*P*2) view with the broadcast
        # operands laid out as (N, Lq, 1, L*P*2): the same arithmetic, in the same
        # order, as broadcasting over (M, L, P, 2) directly, but torch then runs
        # it on contiguous rows of L*P*2 instead of pairs (15x faster at the
        # encoder shape, where the naive form cost more than the attention op).
        flat = (N, Lq, M, L * P * 2)
        per_query = (N, Lq, 1, L * P * 2)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], dim=-1)
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = normalizer.to(offsets.dtype)[:, None, :].expand(L, P, 2).reshape(L * P * 2)
            base = reference_points[:, :, None, :, None, :].expand(N, Lq, 1, L, P, 2).reshape(per_query)
            locations = torch.addcdiv(base, offsets.reshape(flat), normalizer)
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box: P points span half its size
            base = reference_points[:, :, None, :, None, :2].expand(N, Lq, 1, L, P, 2).reshape(per_query)
            size = reference_points[:, :, None, :, None, 2:].expand(N, Lq, 1, L, P, 2).reshape(per_query)
            locations = base + offsets.reshape(flat) / P * size * 0.5
        else:
            raise ValueError(
                f"reference_points must have last dimension 2 (points) or 4 (boxes), "
                f"got shape {tuple(reference_points.shape)}"
            )
        locations = locations.view(N, Lq, M, L, P, 2)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(output)

    def _check_inputs(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor],
    ) -> None:
        """Shape and dtype checks (metadata only, so torch.compile keeps one
        graph) before forward indexes anything: a malformed argument is a
        ValueError naming it, not an IndexError from inside the module."""
        args = {
            "query": query,
            "reference_points": reference_points,
            "input_flatten": input_flatten,
            "input_spatial_shapes": input_spatial_shapes,
            "input_level_start_index": input_level_start_index,
        }
        if input_padding_mask is not None:
            args["input_padding_mask"] = input_padding_mask
        for name, arg in args.items():
            if not isinstance(arg, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(arg).__name__}")
        d, L = self.d_model, self.n_levels
        if query.dim() != 3 or query.shape[2] != d:
            raise ValueError(f"query must have shape (N, Lq, d_model={d}), got {tuple(query.shape)}")
        N, Lq = query.shape[:2]
        if input_flatten.dim() == 3 and input_flatten.shape[0] != N and _looks_sequence_first(query, reference_points,
                                                                                              input_flatten):
            raise ValueError(
                f"query must be batch first, (N, Lq, d_model={d}); got {tuple(query.shape)}, which looks "
                f"sequence first (Lq, N, d_model): pass query.transpose(0, 1)"
            )
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[2] != d:
            raise ValueError(
                f"input_flatten must have shape (N={N}, S, d_model={d}), got {tuple(input_flatten.shape)}"
            )
        S = input_flatten.shape[1]
        if tuple(input_spatial_shapes.shape) != (L, 2):
            raise ValueError(
                f"input_spatial_shapes must have shape (n_levels, 2) = ({L}, 2), got {tuple(input_spatial_shapes.shape)}"
            )
        if input_spatial_shapes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_spatial_shapes must have dtype int32 or int64, got {input_spatial_shapes.dtype}")
        if tuple(input_level_start_index.shape) != (L,):
            raise ValueError(
                f"input_level_start_index must have shape (n_levels,) = ({L},), "
                f"got {tuple(input_level_start_index.shape)}"
            )
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (N, Lq, L):
            raise ValueError(
                f"reference_points must have shape (N, Lq, n_levels, 2 or 4) = ({N}, {Lq}, {L}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if input_padding_mask is not None and tuple(input_padding_mask.shape) != (N, S):
            raise ValueError(
                f"input_padding_mask must have shape (N, S) = ({N}, {S}), got {tuple(input_padding_mask.shape)}"
            )


def _looks_sequence_first(query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor) -> bool:
    """A (Lq, N, d) query: its second size is the batch that reference_points or input_flatten has
    (so the error names the query, not input_flatten whose batch disagrees with it)."""
    batch = query.shape[1]
    if reference_points.dim() == 4 and tuple(reference_points.shape[:2]) == (batch, query.shape[0]):
        return True
    return input_flatten.shape[0] == batch
