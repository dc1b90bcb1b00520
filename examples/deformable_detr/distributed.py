"""Helpers for distributed data parallel training under ``torchrun``.

``torchrun --nproc_per_node=N -m examples.deformable_detr.train ...`` sets
RANK, WORLD_SIZE and LOCAL_RANK; ``init_distributed`` then joins the process
group with NCCL on GPUs and gloo on the CPU. Without those variables every
helper degrades to the single-process answer, so the same code runs both ways.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "cleanup",
    "is_dist_avail_and_initialized",
    "get_world_size",
    "get_rank",
    "is_main_process",
    "all_reduce_sum",
    "all_gather_object",
    "reduce_dict_mean",
]


def init_distributed(device: str) -> torch.device:
    """Join the torchrun process group if launched by torchrun; return this process's device.

    ``device`` is "cpu" or "cuda"; under torchrun each process takes the GPU
    of its LOCAL_RANK.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        backend, result = "nccl", torch.device("cuda", local_rank)
    else:
        backend, result = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return result


def cleanup() -> None:
    if is_dist_avail_and_initialized():
        # Every rank reaches this point before any tears the group down: with
        # gloo, a rank whose peer has already exited can abort at exit
        # ("terminate called without an active exception"), seen once in CI.
        dist.barrier()
        dist.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a copy; the input is unchanged)."""
    tensor = tensor.clone()
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` when not distributed)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over processes (for logging)."""
    if not is_dist_avail_and_initialized() or not values:
        return values
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    return dict(zip(names, stacked / get_world_size()))
