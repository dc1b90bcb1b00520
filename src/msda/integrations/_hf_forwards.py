"""The replacements that :mod:`msda.integrations.transformers` installs into
Hugging Face transformers: the layer's forward, the functions, and the faster
location arithmetic of the attention modules that call the layer.

Nothing here imports transformers; each function takes exactly the arguments
of what it replaces.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import ms_deform_attn

__all__ = [
    "MultiScaleDeformableAttention",
    "layer_forward",
    "function",
    "function_v2",
    "make_function_v2",
    "sampling_locations",
    "wrapper_forward",
]


def _same_dtype(value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # msda takes locations and weights in value's dtype or float32; transformers'
    # grid_sample path accepts any float mix (autocast can produce e.g. float16
    # weights next to a bfloat16 value), so widen the odd one out to float32.
    if t.dtype == value.dtype or t.dtype == torch.float32:
        return t
    return t.float()


def layer_forward(
    self: nn.Module,
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    value_spatial_shapes_list: list,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int,
) -> torch.Tensor:
    """``MultiScaleDeformableAttention.forward`` of transformers, on msda.
    ``value_spatial_shapes_list`` and ``im2col_step`` are not needed."""
    return ms_deform_attn(
        value,
        value_spatial_shapes,
        level_start_index,
        _same_dtype(value, sampling_locations),
        _same_dtype(value, attention_weights),
    )


class MultiScaleDeformableAttention(nn.Module):
    """A stateless layer for the ``kernels`` library's layer mapping (what
    transformers' ``use_kernels=True`` consults): it replaces the forward of
    transformers' ``MultiScaleDeformableAttention`` with msda's op.

    ``kernels`` requires no ``__init__`` and no members besides the two flags,
    and a forward with the arguments of the layer it replaces.
    """

    can_torch_compile = True
    has_backward = True

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        return layer_forward(
            self,
            value,
            value_spatial_shapes,
            value_spatial_shapes_list,
            level_start_index,
            sampling_locations,
            attention_weights,
            im2col_step,
        )


def _shapes_and_starts(
    value: torch.Tensor, value_spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    # mask2former/oneformer pass the shapes as a list of (H, W) ints; msda wants
    # them as tensors plus the level start rows, built here from the same list.
    if isinstance(value_spatial_shapes, torch.Tensor):
        shapes = value_spatial_shapes.to(device=value.device, dtype=torch.int64)
    else:
        shapes = torch.tensor([[int(h), int(w)] for h, w in value_spatial_shapes], dtype=torch.int64, device=value.device)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return shapes, starts


def function(
    value: torch.Tensor,
    value_spatial_shapes: Union[torch.Tensor, list],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``multi_scale_deformable_attention`` of mask2former and oneformer, on msda."""
    shapes, starts = _shapes_and_starts(value, value_spatial_shapes)
    return ms_deform_attn(
        value, shapes, starts, _same_dtype(value, sampling_locations), _same_dtype(value, attention_weights)
    )


def function_v2(
    value: torch.Tensor,
    value_spatial_shapes: Union[torch.Tensor, list],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: list,
    method: str = "default",
    *,
    original: Optional[Callable[..., torch.Tensor]] = None,
) -> torch.Tensor:
    """``multi_scale_deformable_attention_v2`` (rt_detr_v2, d_fine, deimv2) on
    msda, where msda computes the same thing: bilinear sampling ("default") with
    the same number of points on every level. Otherwise ``original`` runs
    (the "discrete" method rounds to pixels; msda's op always interpolates)."""
    points = [int(p) for p in num_points_list]
    if method != "default" or len(set(points)) != 1:
        if original is None:
            raise ValueError(
                f"msda runs multi_scale_deformable_attention_v2 only with method='default' and the same number of "
                f"points on every level, got method={method!r}, num_points_list={points}"
            )
        return original(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method)
    N, Lq, M = sampling_locations.shape[:3]
    L, P = len(points), points[0]
    shapes, starts = _shapes_and_starts(value, value_spatial_shapes)
    # v2 lays the points out level-major as (..., L*P): the same order as (L, P).
    locations = sampling_locations.reshape(N, Lq, M, L, P, 2)
    weights = attention_weights.reshape(N, Lq, M, L, P)
    return ms_deform_attn(value, shapes, starts, _same_dtype(value, locations), _same_dtype(value, weights))


def make_function_v2(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function_v2`` bound to the family's own function for the cases msda
    does not cover, with the original's signature."""

    def multi_scale_deformable_attention_v2(
        value: torch.Tensor,
        value_spatial_shapes: Union[torch.Tensor, list],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        num_points_list: list,
        method: str = "default",
    ) -> torch.Tensor:
        return function_v2(
            value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method, original=original
        )

    multi_scale_deformable_attention_v2.__wrapped_original__ = original  # type: ignore[attr-defined]
    return multi_scale_deformable_attention_v2


def sampling_locations(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor, n_points: int
) -> torch.Tensor:
    """Transformers' sampling locations, bitwise equal, but cheap.

    ``offsets`` is (N, Lq, M, L, P, 2); ``reference_points`` (N, Lq, L, 2)
    points or (N, Lq, L, 4) boxes. Transformers broadcasts the reference points
    and the normaliser over (M, L, P, 2) directly, which torch runs two
    elements at a time. Here the same operations, in the same order and with
    the same dtype promotions, run on a (N, Lq, M, L*P*2) view whose operands
    broadcast only over M, so each one is a contiguous row of L*P*2: equal
    bits, several times faster at the encoder's shapes.
    """
    N, Lq, M, L, P, _ = offsets.shape
    flat = offsets.reshape(N, Lq, M, L * P * 2)
    per_query = (N, Lq, 1, L * P * 2)
    if reference_points.shape[-1] == 2:
        # offsets are in pixels of each level; transformers divides by the
        # integer (W_l, H_l) tensor itself, so keep it integer (same promotion).
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        normalizer = normalizer[:, None, :].expand(L, P, 2).reshape(L * P * 2)
        base = reference_points[:, :, None, :, None, :].expand(N, Lq, 1, L, P, 2).reshape(per_query)
        locations = base + flat / normalizer
    elif reference_points.shape[-1] == 4:
        base = reference_points[:, :, None, :, None, :2].expand(N, Lq, 1, L, P, 2).reshape(per_query)
        size = reference_points[:, :, None, :, None, 2:].expand(N, Lq, 1, L, P, 2).reshape(per_query)
        locations = base + flat / n_points * size * 0.5
    else:
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")
    return locations.view(N, Lq, M, L, P, 2)


def wrapper_forward(compilable_check: Callable[..., Any]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The forward of transformers' ``<Family>MultiscaleDeformableAttention``
    (the module that owns the projections and calls the layer as ``self.attn``)
    with :func:`sampling_locations` in place of its broadcast arithmetic;
    every other step is the family's own, in its order. ``compilable_check`` is
    the family module's ``torch_compilable_check``."""

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        position_embeddings: Optional[torch.Tensor] = None,
        reference_points: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        spatial_shapes_list: Optional[list] = None,
        level_start_index: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        batch_size, num_queries, _ = hidden_states.shape
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        total_elements = sum(height * width for height, width in spatial_shapes_list)
        compilable_check(
            total_elements == sequence_length,
            "Make sure to align the spatial shapes with the sequence length of the encoder hidden states",
        )
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            # transformers' attention_mask is True at valid pixels (msda's
            # MSDeformAttn takes the opposite, a padding mask): invert it.
            value = value.masked_fill(~attention_mask[..., None], float(0))
        value = value.view(batch_size, sequence_length, M, self.d_model // M)
        offsets = self.sampling_offsets(hidden_states).view(batch_size, num_queries, M, L, P, 2)
        weights = self.attention_weights(hidden_states).view(batch_size, num_queries, M, L * P)
        weights = F.softmax(weights, -1).view(batch_size, num_queries, M, L, P)
        locations = sampling_locations(reference_points, offsets, spatial_shapes, P)
        output = self.attn(
            value, spatial_shapes, spatial_shapes_list, level_start_index, locations, weights, self.im2col_step
        )
        return self.output_proj(output), weights

    return forward
