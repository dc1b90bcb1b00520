"""The CPU backward is deterministic without atomics: bitwise-identical
gradients from run to run and with 1 or 2 threads, including the shapes
where the channels are split into blocks (N*M small), with and without the
per-head copies that the kernels use when value's rows are sampled often."""

from __future__ import annotations

import pytest
import torch

import msda
from cases import make_case, run_op

SHAPES = {
    "wide head (N1 M1 D256)": dict(N=1, Lq=300, M=1, D=256, shapes=[(20, 30), (10, 15)], P=4),
    "encoder-like": dict(N=1, Lq=400, M=8, D=32, shapes=[(16, 25), (8, 13), (4, 7)], P=4),
    "odd channels": dict(N=2, Lq=50, M=3, D=71, shapes=[(9, 7), (5, 4)], P=3),
    # Few samples per row of value: the kernels work on value and grad_value in
    # place instead of per-head copies (csrc/cpu/head_copies.h).
    "decoder-like": dict(N=2, Lq=20, M=4, D=32, shapes=[(16, 25), (8, 13)], P=4),
}


def _grads(problem, dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = make_case(**problem, seed=11, value_dtype=dtype, outside_fraction=0.05)
        # Many queries on few pixels: lots of collisions in grad_value.
        return run_op(msda.ms_deform_attn, case)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitwise_identical_across_runs_and_threads(name, dtype):
    problem = SHAPES[name]
    out1, grads1 = _grads(problem, dtype, threads=1)
    for threads in (2, 2, 1):
        out, grads = _grads(problem, dtype, threads=threads)
        assert torch.equal(out, out1)
        for a, b in zip(grads, grads1):
            assert torch.equal(a, b), f"gradients differ with {threads} threads"
