"""A demo training step under OMP_WAIT_POLICY=PASSIVE and ACTIVE (and unset).

OpenMP reads the variable once, when torch loads, so each measurement is a
fresh process; the policies alternate round after round, so that other work
on the machine falls on all alike. Each process times a few full training
steps of the demo's model (forward, loss, backward, AdamW; batch 8 at 128 px)
and reports their median. Prints a table, writes JSON
(benchmarks/results/omp_wait_policy.json) with the machine and its load.

    python benchmarks/omp_wait_policy.py [--rounds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKER = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from examples.deformable_detr import demo
from examples.deformable_detr.data import SyntheticSpec, build_dataset, collate_fn, ensure_synthetic_dataset
from examples.deformable_detr.deformable_detr import build_model
from examples.deformable_detr.engine import move_targets
from examples.deformable_detr.train import build_criterion, seed_everything
seed_everything(0)
spec = SyntheticSpec(num_classes=3, image_size=128, seed=0)
ensure_synthetic_dataset({data!r}, {{"train": 16}}, spec)
dataset = build_dataset("train", {data!r}, scale=128 / 800, augment="none")
images, mask, targets = collate_fn([dataset[i] for i in range(8)])
config = demo.demo_config("two_stage", num_classes=4)
model, criterion = build_model(config), build_criterion(config)
step_s = demo.time_training_steps(model, criterion, (images, mask, move_targets(targets, torch.device("cpu"))),
                                  {steps}, 1e-3)
print(json.dumps({{"step_s": step_s, "threads": torch.get_num_threads()}}))
"""


def measure(policy: str | None, steps: int, data: str) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    code = WORKER.format(root=ROOT, data=data, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(prog="omp_wait_policy.py", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per process (after one warm-up)")
    p.add_argument("--data", default=os.path.join(ROOT, "examples", "deformable_detr", "outputs", "omp_bench_data"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "omp_wait_policy.json"))
    a = p.parse_args()
    policies = ["PASSIVE", "ACTIVE", None]
    load_start = os.getloadavg()
    runs: dict[str, list[float]] = {str(x): [] for x in policies}
    for r in range(a.rounds):
        for policy in policies if r % 2 == 0 else policies[::-1]:
            runs[str(policy)].append(measure(policy, a.steps, a.data)["step_s"])
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in runs.items()),
              flush=True)
    load_end = os.getloadavg()
    print(f"\ndemo training step (batch 8, 128 px), median over {a.rounds} rounds; load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores")
    summary = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
    for k, ms in summary.items():
        print(f"  OMP_WAIT_POLICY={'unset' if k == 'None' else k:<8} {ms:8.0f} ms  ({ms / summary['PASSIVE']:.2f}x PASSIVE)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"median_step_ms": summary, "runs_s": runs, "rounds": a.rounds, "steps": a.steps,
                   "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": load_end}, f,
                  indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
