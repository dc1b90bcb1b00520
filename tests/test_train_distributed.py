"""Data-parallel training under torchrun (2 processes, gloo) gives the gradients
of a single process training on the same images.

The images all have the same size and dropout is 0, so padding and randomness
cannot differ; each rank gets half of every batch. That the gradients match
checks the box-count normaliser: it is summed over processes and divided by
their number, so that DDP's gradient averaging yields the whole-batch gradient.

Run as a script (by torchrun), this file is the worker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import msda

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from examples.deformable_detr import distributed  # noqa: E402
from examples.deformable_detr.configs import tiny_config  # noqa: E402
from examples.deformable_detr.data import SyntheticSpec, build_dataset, collate_fn, ensure_synthetic_dataset  # noqa: E402
from examples.deformable_detr.deformable_detr import build_model  # noqa: E402
from examples.deformable_detr.engine import train_one_epoch  # noqa: E402
from examples.deformable_detr.train import build_criterion  # noqa: E402

STEPS, BATCH, WORLD = 3, 4, 2


def _batches(root: str, rank: int, world: int) -> list:
    """STEPS batches of BATCH same-size images; this rank's share of each."""
    dataset = build_dataset("train", root, scale=64 / 800, augment="none")
    share = BATCH // world
    return [
        collate_fn([dataset[step * BATCH + rank * share + i] for i in range(share)])
        for step in range(STEPS)
    ]


def run_training(root: str) -> list[dict[str, torch.Tensor]]:
    """A few SGD steps through the real training loop; the gradients of every step.

    No gradient clipping: it would hide a wrongly scaled gradient (clipped to the same norm).
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    config = tiny_config("two_stage", num_classes=4, frozen_stem_and_layer1=False, dropout=0.0)
    model = build_model(config)
    criterion = build_criterion(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if distributed.is_dist_avail_and_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    grads: list[dict[str, torch.Tensor]] = []
    batches = _batches(root, distributed.get_rank(), distributed.get_world_size())
    train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), 0, max_norm=0,
                    after_step=lambda _: grads.append({n: p.grad.clone() for n, p in zip(names, params)}))
    return grads


def _make_data(root: str) -> None:
    spec = SyntheticSpec(num_classes=3, image_size=64, size_jitter=0.0, min_scale=0.3, seed=7)
    ensure_synthetic_dataset(root, {"train": STEPS * BATCH}, spec)


def test_two_process_gradients_match_single_process(tmp_path) -> None:
    root, out = str(tmp_path / "data"), str(tmp_path / "ddp_grads.pt")
    _make_data(root)
    # the workers import the same msda as this process (installed or the source tree)
    msda_parent = os.path.dirname(os.path.dirname(os.path.abspath(msda.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([msda_parent, REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.abspath(__file__), root, out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_grads = torch.load(out)
    single_grads = run_training(root)
    assert len(ddp_grads) == len(single_grads) == STEPS
    for step, (got, want) in enumerate(zip(ddp_grads, single_grads)):
        assert got.keys() == want.keys()
        scale = max(g.abs().max().item() for g in want.values())
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-4 * scale, rtol=1e-3,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")
    # the steps really trained: later gradients differ from the first
    assert any(not torch.allclose(ddp_grads[0][n], ddp_grads[-1][n]) for n in ddp_grads[0])


if __name__ == "__main__":
    data_root, out_path = sys.argv[1], sys.argv[2]
    distributed.init_distributed("cpu")
    assert distributed.get_world_size() == WORLD, "run me with torchrun --nproc_per_node=2"
    grads = run_training(data_root)
    if distributed.is_main_process():
        torch.save(grads, out_path)
    distributed.cleanup()
