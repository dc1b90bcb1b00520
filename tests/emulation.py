"""The CUDA emulation module (tests/cuda_emulation), built once per test
process, for tests outside test_cuda_emulation.py."""

from __future__ import annotations

import functools
import os
import sys

from cases import deterministic_algorithms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
from build import load_emulation  # noqa: E402


@functools.lru_cache(maxsize=None)
def emulation():
    module = load_emulation()
    module.set_seed(int(os.environ.get("MSDA_EMULATION_SEED", "12345")))
    return module


def run_deterministic(emu, inputs, grad_output):
    """The emulated forward and backward of `inputs` under
    torch.use_deterministic_algorithms(True): (out, grads, the atomics they issued)."""
    before = emu.stats()["atomics"]
    with deterministic_algorithms():
        out = emu.forward(*inputs)
        grads = emu.backward(*inputs, grad_output)
    return out, grads, emu.stats()["atomics"] - before
