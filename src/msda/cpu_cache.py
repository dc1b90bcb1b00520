"""The cache that msda's CPU ops take their large outputs from.

A model calls the op once per layer, and each call returns tensors of tens of
MB (the output; in training the gradients). The system hands memory that
large out as fresh pages, and the first write to each 4 KiB page costs a page
fault: in transformers' Deformable DETR at 800x1333 on a 2-core Intel Xeon,
about 8 ms of a 30 ms encoder call. So blocks of at least 1 MiB that msda's
CPU ops allocated go back to this cache when their tensor is freed, and the
next call of the same size reuses one, already in memory.

Idle blocks are kept up to a limit, the oldest released first:
``MSDA_CPU_CACHE_MB`` (read once, when msda loads; default 256, ``0``
turns the cache off) or :func:`set_limit`. Memory held this way shows in the
process's resident size but not in torch's own allocator statistics.

    import msda.cpu_cache
    msda.cpu_cache.stats()     # CacheStats(idle_bytes=..., ...)
    msda.cpu_cache.release()   # free the idle blocks now
    msda.cpu_cache.set_limit(0)  # stop caching
    t = msda.cpu_cache.empty((22223, 256))  # a tensor whose block comes from the cache
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ._extension import AVAILABLE, EXTENSION, UNAVAILABLE_REASON

__all__ = ["CacheStats", "stats", "release", "set_limit", "empty"]


class CacheStats(NamedTuple):
    idle_bytes: int  # held by the cache, in no tensor
    idle_blocks: int
    limit_bytes: int  # idle bytes kept at most
    reuses: int  # allocations served from an idle block, since the library loaded
    fresh_blocks: int  # allocations that took new memory (blocks of 1 MiB or more)


def _extension():
    if not AVAILABLE:
        raise RuntimeError(f"msda.cpu_cache needs msda's compiled extension: {UNAVAILABLE_REASON}")
    return EXTENSION


def stats() -> CacheStats:
    """What the cache holds now, and how often it has been used."""
    return CacheStats(*_extension().cpu_cache_stats())


def release() -> int:
    """Free every idle block now; returns the bytes freed. Tensors in use are not affected."""
    return _extension().cpu_cache_release()


def set_limit(megabytes: float) -> float:
    """Keep at most ``megabytes`` MiB of idle blocks (0: no caching), freeing
    the oldest above it; returns the previous limit in MiB."""
    if not megabytes >= 0:  # also refuses NaN
        raise ValueError(f"set_limit: megabytes must be a number >= 0, got {megabytes!r}")
    return _extension().cpu_cache_set_limit(int(megabytes * 1048576)) / 1048576


def empty(size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, like ``torch.empty(size, dtype=dtype)``,
    whose memory (from 1 MiB) comes from the cache and goes back to it when the
    tensor is freed: for a large temporary built on every call, written with
    an ``out=`` argument, e.g. ``torch.add(a, b, out=msda.cpu_cache.empty(a.shape))``.
    Eager mode only (torch.compile and export do not trace it)."""
    _extension()
    return torch.ops.msda.cpu_cache_empty([int(s) for s in size], dtype)
