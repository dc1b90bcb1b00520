"""Wall-clock timing: warm-up calls, then the median of repeated calls.

The median, not the mean or minimum, because the machine is shared: the
median ignores a few runs slowed down by other processes without rewarding a
lucky one. On CUDA every call is bracketed by synchronisations, so the time is
that of the kernels and not of their launch.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, object]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns the median and every sample, in seconds.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "samples_s": samples, "warmup": warmup, "repeats": repeats}


def forward_and_backward(
    forward: Callable[[], torch.Tensor], grad_output: torch.Tensor, leaves: list[torch.Tensor]
) -> Callable[[], None]:
    """A closure that runs forward then backward with a fixed grad_output.

    The leaves' ``.grad`` is dropped first so that every call allocates its
    gradients afresh (as a training step does after ``zero_grad(set_to_none=True)``)
    instead of accumulating into the previous ones.
    """

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.backward(grad_output)

    return step
