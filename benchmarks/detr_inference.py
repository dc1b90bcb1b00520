"""End-to-end inference latency of the full Deformable DETR (R50, multi-scale) at 800x1333:
msda's compiled kernels against the pure-PyTorch reference op, in the same run.

    python benchmarks/detr_inference.py [--repeats 3] [--device cpu]

Both configurations run the same model and input; the reference one routes every
MSDeformAttn through ``msda.ms_deform_attn_reference``. Runs alternate between the two so that
load on the machine affects both alike. Prints a table and writes JSON
(benchmarks/results/detr_inference.json) with the machine description.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import msda  # noqa: E402
from msda import _extension  # noqa: E402

from examples.deformable_detr.configs import config_for_variant  # noqa: E402
from examples.deformable_detr.deformable_detr import build_model  # noqa: E402
from examples.deformable_detr.reference_op import reference_op  # noqa: E402


def write_result(path: str, result: dict) -> None:
    """Write a benchmark's result as JSON, stamped with the UTC date, and say where."""
    result["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "msda": msda.__version__,
        "msda_kernel_devices": sorted(_extension.KERNEL_DEVICES),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: record it
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="base")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=os.path.join(REPO_ROOT, "benchmarks", "results", "detr_inference.json"))
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type not in _extension.KERNEL_DEVICES:
        sys.exit(f"msda has no compiled {device.type} kernels here (python -m msda info): nothing to compare")
    torch.manual_seed(0)
    model = build_model(config_for_variant(args.variant)).eval().to(device)
    images = torch.randn(args.batch, 3, args.height, args.width, device=device)
    mask = torch.zeros(args.batch, args.height, args.width, dtype=torch.bool, device=device)

    def run() -> tuple[float, dict]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(images, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    configs = {"msda kernels": contextlib.nullcontext, "reference op": reference_op}
    times: dict[str, list[float]] = {name: [] for name in configs}
    outputs = {}
    for name, ctx in configs.items():  # warm-up (allocator, first-call costs), outputs kept
        with ctx():
            _, outputs[name] = run()
    for _ in range(args.repeats):
        for name, ctx in configs.items():
            with ctx():
                times[name].append(run()[0])

    diff = max(
        (outputs["msda kernels"][key] - outputs["reference op"][key]).abs().max().item()
        for key in ("pred_logits", "pred_boxes")
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    speedup = medians["reference op"] / medians["msda kernels"]
    print(f"Deformable DETR ({args.variant}, R50) inference, batch {args.batch}, {args.height}x{args.width}, "
          f"{device.type}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| op | median s | runs (s) |\n| --- | --- | --- |")
    for name in configs:
        print(f"| {name} | {medians[name]:.3f} | {', '.join(f'{t:.3f}' for t in times[name])} |")
    print(f"speed-up of the whole model: {speedup:.2f}x; max |output difference| {diff:.2e}")

    result = {
        "benchmark": "detr_inference",
        "model": f"Deformable DETR {args.variant} R50",
        "input": [args.batch, 3, args.height, args.width],
        "device": device.type,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": medians,
        "speedup": speedup,
        "max_abs_output_diff": diff,
        "machine": machine(),
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
