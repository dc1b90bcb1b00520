"""What both integrations share: the cheap, bitwise-equal sampling-location
arithmetic and position add, and msda's op called the way the grid_sample
functions of transformers and mmcv are (shapes only, no level start rows)."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .. import cpu_cache
from .._extension import AVAILABLE as _EXTENSION_LOADED
from ..ops import ms_deform_attn

__all__ = [
    "match_dtype",
    "shapes_and_starts",
    "attention_from_shapes",
    "sampling_locations",
    "any_true",
    "reusable_output",
    "softmax_last",
    "add_position",
]


def match_dtype(value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # msda takes locations and weights in value's dtype or float32; the
    # grid_sample paths accept any float mix (autocast can produce e.g. float16
    # weights next to a bfloat16 value), so widen the odd one out to float32.
    if t.dtype == value.dtype or t.dtype == torch.float32:
        return t
    return t.float()


def shapes_and_starts(
    value: torch.Tensor, value_spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    # The grid_sample functions take the shapes alone (a tensor, or a list of
    # (H, W) ints in transformers); msda also wants the level start rows.
    if isinstance(value_spatial_shapes, torch.Tensor):
        shapes = value_spatial_shapes.to(device=value.device, dtype=torch.int64)
    else:
        pairs = [[int(h), int(w)] for h, w in value_spatial_shapes]
        shapes = torch.tensor(pairs, dtype=torch.int64, device=value.device)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return shapes, starts


def attention_from_shapes(
    value: torch.Tensor,
    value_spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """msda's op with the arguments of transformers' ``multi_scale_deformable_attention``
    and mmcv's ``multi_scale_deformable_attn_pytorch``."""
    shapes, starts = shapes_and_starts(value, value_spatial_shapes)
    return ms_deform_attn(
        value, shapes, starts, match_dtype(value, sampling_locations), match_dtype(value, attention_weights)
    )


def any_true(mask: torch.Tensor) -> bool:
    """Whether ``mask`` may hold a True, asked only where asking is free: a CPU
    tensor in eager mode. Elsewhere the answer is True (may), since reading the
    values would sync a GPU, break a ``torch.compile`` graph, or bake one
    input's answer into a traced or exported graph.

    The modules mask the value at padded pixels with a full copy of it
    (``masked_fill``); where no pixel is padded, skipping it is exact."""
    if (
        type(mask) is not torch.Tensor  # a subclass or a tracer's proxy: not a plain value to read
        or mask.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    ):
        return True
    return bool(mask.any())


def _eager_plain(t: torch.Tensor) -> bool:
    """A plain tensor in eager mode (not a subclass, a tracer's proxy, or a graph being compiled or exported)."""
    return not (
        type(t) is not torch.Tensor
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def reusable_output(module: torch.nn.Module, output: torch.Tensor, module_input: torch.Tensor) -> bool:
    """Whether ``output``, just returned by ``module`` (a projection) for
    ``module_input``, may be overwritten: nobody else can hold it (no forward
    hook on the module or global one saw it, and it shares no memory with the
    input, as a module that returns its input would), autograd needs it for
    nothing, and it is a plain tensor in eager mode. The attention modules'
    next steps (softmax, sampling locations) then write into it instead of
    allocating a tensor of the same size: fewer passes over memory and, for
    the encoder's tensors of tens of MB, no fresh pages to fault in on every
    call."""
    return (
        _eager_plain(output)
        and not (torch.is_grad_enabled() and output.requires_grad)
        and not module._forward_hooks
        and not torch.nn.modules.module._global_forward_hooks
        and output.untyped_storage().data_ptr() != module_input.untyped_storage().data_ptr()
    )


def add_position(hidden_states: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
    """``hidden_states + position_embeddings``, the same bits. In eager CPU
    code where autograd records nothing, the sum is written into a block of
    msda's CPU cache (:func:`msda.cpu_cache.empty`, blocks of 1 MiB or more):
    at the encoder's shapes it is a new tensor of tens of MB on every call,
    whose fresh pages would each fault on first write (at 800x1333, about 5600
    faults per encoder layer)."""
    if (
        _EXTENSION_LOADED
        and _eager_plain(hidden_states)
        and _eager_plain(position_embeddings)
        and hidden_states.device.type == "cpu"
        and position_embeddings.device.type == "cpu"
        and not (torch.is_grad_enabled() and (hidden_states.requires_grad or position_embeddings.requires_grad))
    ):
        size = torch.broadcast_shapes(hidden_states.shape, position_embeddings.shape)
        out = cpu_cache.empty(size, torch.result_type(hidden_states, position_embeddings))
        return torch.add(hidden_states, position_embeddings, out=out)
    return hidden_states + position_embeddings


def softmax_last(logits: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``F.softmax(logits, -1)``, written into ``logits`` when ``in_place``
    (the same kernel and bits: each row is read whole before it is written)."""
    if in_place:
        return torch.softmax(logits, -1, out=logits)
    return torch.nn.functional.softmax(logits, -1)


def sampling_locations(
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    spatial_shapes: torch.Tensor,
    n_points: int,
    overwrite_offsets: bool = False,
) -> torch.Tensor:
    """The sampling locations of transformers' and mmcv's modules, bitwise
    equal, but cheap.

    ``offsets`` is (N, Lq, M, L, P, 2); ``reference_points`` (N, Lq, L, 2)
    points or (N, Lq, L, 4) boxes. Both broadcast the reference points
    and the normaliser over (M, L, P, 2) directly, which torch runs two
    elements at a time. Here the same operations, in the same order and with
    the same dtype promotions, run on a (N, Lq, M, L*P*2) view whose operands
    broadcast only over M, so each one is a contiguous row of L*P*2: equal
    bits, several times faster at the encoder's shapes. Where the steps'
    result already has the final dtype, the last steps run in place on it
    (fewer passes over, and allocations of, a tensor as large as the offsets);
    autograd saves none of the tensors they overwrite. ``overwrite_offsets``
    (the caller's promise that nothing else holds ``offsets`` and that no
    gradient flows, see :func:`reusable_output`): the result is written into
    ``offsets`` itself where its dtype allows.
    """
    N, Lq, M, L, P, _ = offsets.shape
    flat = offsets.reshape(N, Lq, M, L * P * 2)
    per_query = (N, Lq, 1, L * P * 2)
    if reference_points.shape[-1] == 2:
        # offsets are in pixels of each level; both divide by the integer
        # (W_l, H_l) tensor itself, so keep it integer (same promotion).
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        normalizer = normalizer[:, None, :].expand(L, P, 2).reshape(L * P * 2)
        base = _per_point(reference_points, (N, Lq, L, P)).view(per_query)
        if flat.dtype in (torch.float32, torch.float64) and base.dtype == flat.dtype and not (
            torch.is_grad_enabled() and (flat.requires_grad or base.requires_grad)
        ):
            # One pass: addcdiv computes base + 1 * (flat / normalizer), the
            # same bits (the sizes are exact in the offsets' dtype). Not with
            # a gradient: addcdiv's multiplies by 1 / normalizer instead.
            locations = torch.addcdiv(base, flat, normalizer.to(flat.dtype), out=flat if overwrite_offsets else None)
        else:
            step = flat / normalizer
            # base + step, in place where step already has the result's dtype
            # (addition commutes bitwise; autograd saved only the divisor).
            locations = step.add_(base) if _same_result_dtype(step, base) else base + step
    elif reference_points.shape[-1] == 4:
        base = _per_point(reference_points[..., :2], (N, Lq, L, P)).view(per_query)
        size = _per_point(reference_points[..., 2:], (N, Lq, L, P)).view(per_query)
        step = flat.div_(n_points) if overwrite_offsets and flat.is_floating_point() else flat / n_points
        in_place = _same_result_dtype(step, size) and _same_result_dtype(step, base)
        # mul_ would have to save step for size's gradient: in place only without one.
        if in_place and not (torch.is_grad_enabled() and size.requires_grad):
            locations = step.mul_(size).mul_(0.5).add_(base)
        else:
            locations = base + step * size * 0.5
    else:
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")
    return locations.view(N, Lq, M, L, P, 2)


# Integer dtypes as wide as an (x, y) pair of each 16- and 32-bit float dtype.
_PAIR_AS = {2: torch.int32, 4: torch.int64}


def _per_point(pairs: torch.Tensor, points: tuple[int, int, int, int]) -> torch.Tensor:
    """``pairs`` (N, Lq, L, 2), or any shape that broadcasts to it (one pair
    for all levels), repeated for each of the P points of ``points``
    (N, Lq, L, P): a contiguous (N, Lq, L, P, 2) tensor, the same bits.

    torch copies a broadcast of 2-element rows an element at a time (about
    1 ms at the encoder's shape, a quarter of the whole location step);
    read as one integer per pair, the same copy moves whole pairs, several
    times faster. Only for a plain eager tensor that needs no gradient (the
    integer view has none, and graphs are traced in the float form)."""
    shape = (*points, 2)
    wide = _PAIR_AS.get(pairs.element_size())
    if (
        _eager_plain(pairs)  # first: torch.compile must not trace the questions below
        and wide is not None
        and not (torch.is_grad_enabled() and pairs.requires_grad)
        and pairs.stride(-1) == 1
        and all(stride % 2 == 0 for stride in pairs.stride()[:-1])
        and pairs.storage_offset() % 2 == 0
    ):
        whole = pairs.view(wide)[..., None, 0].expand(shape[:-1])
        return whole.contiguous().view(pairs.dtype).view(shape)
    return pairs[:, :, :, None, :].expand(shape).contiguous()


def _same_result_dtype(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Both have dimensions, so promotion is by dtype alone (and, unlike
    # torch.result_type, this traces under torch.compile).
    return torch.promote_types(a.dtype, b.dtype) == a.dtype
