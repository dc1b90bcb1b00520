"""Run a model's deformable attention through the pure-PyTorch reference, for
side-by-side timings of msda's kernels and the op everyone falls back to."""

from __future__ import annotations

import contextlib
from typing import Iterator

import msda
import msda.module


@contextlib.contextmanager
def reference_op() -> Iterator[None]:
    """Route every ``msda.MSDeformAttn`` through ``msda.ms_deform_attn_reference``
    for the duration of the ``with`` block."""
    original = msda.module.ms_deform_attn
    msda.module.ms_deform_attn = msda.ms_deform_attn_reference
    try:
        yield
    finally:
        msda.module.ms_deform_attn = original
