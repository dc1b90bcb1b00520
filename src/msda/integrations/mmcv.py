"""mmcv's multi-scale deformable attention, on msda.

* :class:`MultiScaleDeformableAttention`: mmcv 2.x's module (constructor,
  defaults, initialisation, state_dict keys, forward with residual, dropout and
  ``batch_first``) without needing mmcv.
* :class:`MultiScaleDeformableAttnFunction`: mmcv's ``apply(value,
  spatial_shapes, level_start_index, sampling_locations, attention_weights,
  im2col_step)``.
* :func:`patch`: routes an installed ``mmcv.ops`` to msda, so code that builds
  mmcv's module (mmdet, BEVFormer-style projects, registry configs) speeds up
  unchanged; :func:`unpatch` undoes it.
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..function import MSDeformAttnFunction
from ..ops import ms_deform_attn
from ._shared import (
    add_position,
    any_true,
    attention_from_shapes,
    reusable_output,
    sampling_locations,
    softmax_last,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "MultiScaleDeformableAttnFunction",
    "multi_scale_deformable_attn_pytorch",
    "patch",
    "unpatch",
]


class MultiScaleDeformableAttnFunction(MSDeformAttnFunction):
    """mmcv's ``MultiScaleDeformableAttnFunction``: only ``apply``, with mmcv's
    arguments; ``im2col_step`` has no effect (any batch size works)."""


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """mmcv's CPU function ``multi_scale_deformable_attn_pytorch`` (same
    arguments: no level start index), running msda's op."""
    return attention_from_shapes(value, value_spatial_shapes, sampling_locations, attention_weights)


class MultiScaleDeformableAttention(nn.Module):
    """mmcv 2.x's ``MultiScaleDeformableAttention``, running msda's op.

    Same constructor and defaults, parameter names (its state_dicts load both
    ways), initialisation and forward. ``init_cfg`` is kept as an attribute
    (mmengine's ``BaseModule`` is not needed). Unlike mmcv there is no warning
    for a head dimension that is not a power of 2 (msda's kernels take any),
    and the sum(H*W) == S check is the op's own (it names the argument).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
        value_proj_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims must be divisible by num_heads, but got {embed_dims} and {num_heads}")
        self.init_cfg = init_cfg
        self.norm_cfg = norm_cfg
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.im2col_step = im2col_step  # kept for compatibility; no effect
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        # Created in mmcv's order, so the same seed gives the same weights.
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation: offsets start on a star of directions
        (head m at angle 2*pi*m/M, the larger component scaled to 1, point p at
        distance p + 1), uniform attention, xavier-uniform projections."""
        device = self.sampling_offsets.weight.device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32, device=device).view(1, 1, -1, 1)
        grid = grid.view(self.num_heads, 1, 1, 2) * scale
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.num_levels, -1, -1).reshape(-1))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        identity: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        reference_points: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        level_start_index: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """mmcv's forward: ``query`` (num_query, bs, embed_dims), or
        (bs, num_query, embed_dims) with ``batch_first``; ``value`` likewise
        (default: ``query``); ``identity`` is added to the dropped-out output
        (default: ``query`` before ``query_pos``); ``key_padding_mask``
        (bs, num_value) is True at padding; ``reference_points``
        (bs, num_query, num_levels, 2 or 4) normalised points or boxes.
        ``residual=`` is accepted for ``identity``, with mmcv's deprecation
        warning. Returns the shape of ``query``."""
        if "residual" in kwargs:
            if identity is not None:
                raise TypeError("forward() got both 'identity' and its deprecated name 'residual'")
            warnings.warn(
                '"residual" is deprecated in `MultiScaleDeformableAttention.forward`, please use "identity" instead',
                DeprecationWarning,
                stacklevel=2,
            )
            identity = kwargs.pop("residual")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = add_position(query, query_pos)
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        _, num_value, _ = value.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value)
        if key_padding_mask is not None and any_true(key_padding_mask):  # none padded: the fill copies value
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, M, -1)
        offsets = self.sampling_offsets(query)
        reuse_offsets = reusable_output(self.sampling_offsets, offsets, query)
        offsets = offsets.view(bs, num_query, M, L, P, 2)
        logits = self.attention_weights(query)
        reuse_logits = reusable_output(self.attention_weights, logits, query)
        weights = softmax_last(logits.view(bs, num_query, M, L * P), reuse_logits)
        weights = weights.view(bs, num_query, M, L, P)
        if reference_points is None or reference_points.shape[-1] not in (2, 4):
            got = None if reference_points is None else reference_points.shape[-1]
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {got} instead.")
        locations = sampling_locations(reference_points, offsets, spatial_shapes, P, overwrite_offsets=reuse_offsets)
        if level_start_index is None:  # mmcv's CPU path never needed it
            output = attention_from_shapes(value, spatial_shapes, locations, weights)
        else:
            output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity


# ---- patch(): route an installed mmcv to msda

# What mmcv's forward looks up at call time (module globals), and the forward
# itself (for the cheap location arithmetic).
_FORWARD_PARAMS = (
    "self",
    "query",
    "key",
    "value",
    "identity",
    "query_pos",
    "key_padding_mask",
    "reference_points",
    "spatial_shapes",
    "level_start_index",
    "kwargs",
)
_MISSING = object()
_lock = threading.Lock()
_originals: dict = {}


def _mmcv_module() -> Any:
    try:
        from mmcv.ops import multi_scale_deform_attn
    except ImportError as error:
        raise ImportError(
            "msda.integrations.mmcv.patch() needs mmcv with its ops (pip install mmcv); importing "
            f"mmcv.ops.multi_scale_deform_attn failed: {error}. Without mmcv, use "
            "msda.integrations.mmcv.MultiScaleDeformableAttention directly."
        ) from error
    return multi_scale_deform_attn


def patch() -> None:
    """Make mmcv's ``MultiScaleDeformableAttention`` (however it was imported
    or built), ``MultiScaleDeformableAttnFunction`` and
    ``multi_scale_deformable_attn_pytorch`` run msda. Calling it again is
    harmless.

    Raises:
        ImportError: mmcv (with ``mmcv.ops``) is not importable; nothing is changed.
    """
    target = _mmcv_module()
    with _lock:
        if _originals:
            return
        replacements = [
            (target, "MultiScaleDeformableAttnFunction", MultiScaleDeformableAttnFunction),
            (target, "multi_scale_deformable_attn_pytorch", multi_scale_deformable_attn_pytorch),
            # code that imported mmcv's Function class by name before patch()
            # (BEVFormer-style modules) still calls its apply: route that too
            (target.MultiScaleDeformableAttnFunction, "apply", staticmethod(MultiScaleDeformableAttnFunction.apply)),
        ]
        cls = target.MultiScaleDeformableAttention
        if tuple(inspect.signature(cls.forward).parameters) == _FORWARD_PARAMS:
            replacements.append((cls, "forward", MultiScaleDeformableAttention.forward))
        else:
            # An mmcv whose forward differs: its own forward still calls the
            # two functions above, so msda runs; only the arithmetic stays.
            warnings.warn(
                f"mmcv's MultiScaleDeformableAttention.forward{tuple(inspect.signature(cls.forward).parameters)} "
                "is not the one msda mirrors; it keeps its own forward (which now calls msda's op)",
                stacklevel=2,
            )
        for owner, name, new in replacements:
            _originals[(owner, name)] = vars(owner).get(name, _MISSING)
            setattr(owner, name, new)


def unpatch() -> None:
    """Put back what :func:`patch` replaced."""
    with _lock:
        for (owner, name), original in _originals.items():
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        _originals.clear()
