"""The replacements that :mod:`msda.integrations.transformers` installs into
Hugging Face transformers: the layer's forward, the functions, and the faster
location arithmetic of the attention modules that call the layer.

Nothing here imports transformers; each function takes exactly the arguments
of what it replaces.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..ops import ms_deform_attn
from ..ops_v2 import ms_deform_attn_v2
from ._shared import (
    add_position,
    any_true,
    attention_from_shapes,
    match_dtype,
    reusable_output,
    sampling_locations,
    shapes_and_starts,
    softmax_last,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "layer_forward",
    "function",
    "make_function_v2",
    "wrapper_forward",
]


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
        match_dtype(value, sampling_locations),
        match_dtype(value, attention_weights),
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
    forward = layer_forward


def function(
    value: torch.Tensor,
    value_spatial_shapes: Union[torch.Tensor, list],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``multi_scale_deformable_attention`` of mask2former and oneformer, on msda."""
    return attention_from_shapes(value, value_spatial_shapes, sampling_locations, attention_weights)


def make_function_v2(
    original: Callable[..., torch.Tensor], active: Callable[[], bool] = lambda: True
) -> Callable[..., torch.Tensor]:
    """``multi_scale_deformable_attention_v2`` (rt_detr_v2, d_fine, deimv2) on
    msda's v2 op, with the original's signature: any number of points per
    level, both methods ("default" bilinear, "discrete" nearest pixel). The
    equal-points default case runs msda's v1 kernels (the v2 op's own rule).
    ``original`` runs whenever ``active()`` is False: modules built while msda
    was enabled keep this function as an attribute (d_fine, deimv2), and must
    go back to transformers' code after ``disable()``."""

    def multi_scale_deformable_attention_v2(
        value: torch.Tensor,
        value_spatial_shapes: Union[torch.Tensor, list],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        num_points_list: list,
        method: str = "default",
    ) -> torch.Tensor:
        if not active():
            return original(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method)
        shapes, starts = shapes_and_starts(value, value_spatial_shapes)
        # v2 lays the points out level-major as (..., sum P_l): msda's v2 layout.
        return ms_deform_attn_v2(
            value,
            shapes,
            starts,
            match_dtype(value, sampling_locations),
            match_dtype(value, attention_weights),
            [int(p) for p in num_points_list],
            method,
        )

    multi_scale_deformable_attention_v2.__wrapped_original__ = original  # type: ignore[attr-defined]
    return multi_scale_deformable_attention_v2


def wrapper_forward(compilable_check: Callable[..., Any]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The forward of transformers' ``<Family>MultiscaleDeformableAttention``
    (the module that owns the projections and calls the layer as ``self.attn``)
    with :func:`sampling_locations` in place of its broadcast arithmetic and
    :func:`add_position` for its position add;
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
            hidden_states = add_position(hidden_states, position_embeddings)
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
            padding = ~attention_mask
            if any_true(padding):  # no padded pixel: the fill would copy value unchanged
                value = value.masked_fill(padding[..., None], float(0))
        value = value.view(batch_size, sequence_length, M, self.d_model // M)
        offsets = self.sampling_offsets(hidden_states)
        reuse_offsets = reusable_output(self.sampling_offsets, offsets, hidden_states)
        offsets = offsets.view(batch_size, num_queries, M, L, P, 2)
        logits = self.attention_weights(hidden_states)
        reuse_logits = reusable_output(self.attention_weights, logits, hidden_states)
        weights = softmax_last(logits.view(batch_size, num_queries, M, L * P), reuse_logits)
        weights = weights.view(batch_size, num_queries, M, L, P)
        locations = sampling_locations(reference_points, offsets, spatial_shapes, P, overwrite_offsets=reuse_offsets)
        output = self.attn(
            value, spatial_shapes, spatial_shapes_list, level_start_index, locations, weights, self.im2col_step
        )
        return self.output_proj(output), weights

    return forward
