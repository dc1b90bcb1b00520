"""Deformable DETR (R50, multi-scale) on the CPU: onnxruntime running the exported ONNX file
against eager PyTorch with msda's kernels, at 800x1333 and at a small size, in the same run.

    python benchmarks/onnx_detr.py [--repeats 3] [--sizes 800x1333 320x512] [--static]

The model is exported once with ``examples.deformable_detr.export.export_onnx`` (dynamic batch
and image size, msda's op decomposed into gathers by msda.onnx), or once per size with
``--static`` (faster to export). Runs alternate between the two runtimes so that load on the
machine affects both alike. Each size also reports the parity of the raw outputs (largest
|onnxruntime - PyTorch| of the logits and boxes). Random weights: timings and parity do not
depend on them. Prints a table and writes JSON (benchmarks/results/onnx_detr.json) with the
machine description, load average included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

from detr_inference import machine, write_result  # noqa: E402

from examples.deformable_detr import export as deploy  # noqa: E402
from examples.deformable_detr.configs import config_for_variant  # noqa: E402
from examples.deformable_detr.deformable_detr import build_model  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="base")
    p.add_argument("--sizes", nargs="+", default=["800x1333", "320x512"], help="HxW image sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per runtime and size (median reported)")
    p.add_argument("--static", action="store_true", help="export one fixed-size file per size instead of one dynamic file")
    p.add_argument("--output", default=os.path.join(REPO_ROOT, "benchmarks", "results", "onnx_detr.json"))
    args = p.parse_args()
    warnings.simplefilter("ignore")  # the exporter's deprecation chatter

    torch.manual_seed(0)
    model = build_model(config_for_variant(args.variant)).eval()
    sizes = [parse_size(s) for s in args.sizes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners: dict[tuple[int, int], deploy.OnnxRuntimeModel] = {}
        export_seconds = {}
        for size in sizes if args.static else sizes[:1]:
            path = os.path.join(tmp, f"model_{size[0]}x{size[1]}.onnx")
            export_seconds[f"{size[0]}x{size[1]}"] = round(timed(lambda: deploy.export_onnx(model, path, *size)), 1)
            print(f"exported at {size[0]}x{size[1]} in {export_seconds[f'{size[0]}x{size[1]}']} s", flush=True)
            runners[size] = deploy.OnnxRuntimeModel(path)
        for size in sizes:
            runner = runners.get(size) or runners[sizes[0]]
            images, mask = deploy.example_inputs(*size, batch=1)
            with torch.no_grad():
                diffs = deploy.compare_with_eager(model, runner, images, mask)  # also the warm-up
                model(images, mask)
                runner(images, mask)
                torch_times, ort_times = [], []
                for _ in range(args.repeats):  # alternate, so load affects both alike
                    torch_times.append(timed(lambda: model(images, mask)))
                    ort_times.append(timed(lambda: runner(images, mask)))
            row = {
                "size": f"{size[0]}x{size[1]}",
                "pytorch_s": round(statistics.median(torch_times), 4),
                "onnxruntime_s": round(statistics.median(ort_times), 4),
                "pytorch_runs_s": [round(t, 4) for t in torch_times],
                "onnxruntime_runs_s": [round(t, 4) for t in ort_times],
                "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
            }
            row["onnxruntime_over_pytorch"] = round(row["onnxruntime_s"] / row["pytorch_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'size':>10} {'PyTorch s':>10} {'ORT s':>10} {'ORT/PT':>7} {'|d logits|':>11} {'|d boxes|':>10}")
    for r in rows:
        d = r["max_abs_diff"]
        print(
            f"{r['size']:>10} {r['pytorch_s']:>10.3f} {r['onnxruntime_s']:>10.3f} {r['onnxruntime_over_pytorch']:>7.2f} "
            f"{d['pred_logits']:>11.2e} {d['pred_boxes']:>10.2e}"
        )
    result = {
        "benchmark": "onnx_detr",
        "variant": args.variant,
        "batch": 1,
        "export": "static per size" if args.static else "one dynamic file",
        "export_seconds": export_seconds,
        "repeats": args.repeats,
        "rows": rows,
        "machine": machine(),
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
