"""What scripts/gpu_check.sh runs after the tests, on a machine with a GPU:
CUDA against the CPU kernels and float64 on randomized cases (v1, v2 in both
methods, the deterministic backward), and the CUDA benchmark of the original
Deformable DETR shapes (forward and forward+backward, msda against the
grid_sample reference). Writes one JSON.

    python scripts/gpu_check.py --out gpu_check.json [--tests-json pytest.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import msda  # noqa: E402
from cases import float64_truth, make_case, run_op  # noqa: E402  (tests/cases.py)
from cases_v2 import float64_truth_v2, make_case_v2, run_op_v2  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def on(t: torch.Tensor, device: str) -> torch.Tensor:
    return t.to(device)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of `want` (at least 1)."""
    if got.numel() == 0:
        return 0.0
    diff = (got.double().cpu() - want.double().cpu()).abs().max().item()
    return diff / max(want.double().abs().max().item(), 1.0)


def compare_v1(seed: int, dtype: torch.dtype, deterministic: bool, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    D = int(torch.randint(1, 300, (1,), generator=g))
    shapes = [tuple(int(x) for x in torch.randint(1, 30, (2,), generator=g)) for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
    case = make_case(N=2, Lq=int(torch.randint(1, 200, (1,), generator=g)), M=int(torch.randint(1, 9, (1,), generator=g)),
                     D=D, shapes=shapes, P=int(torch.randint(1, 5, (1,), generator=g)), seed=seed, value_dtype=dtype)
    cpu = run_op(msda.ms_deform_attn, case)
    gpu_case = type(case)(*(on(t, device) for t in (case.value, case.spatial_shapes, case.level_start_index,
                                                     case.sampling_locations, case.attention_weights,
                                                     case.grad_output)))
    torch.use_deterministic_algorithms(deterministic)
    try:
        gpu = run_op(msda.ms_deform_attn, gpu_case)
    finally:
        torch.use_deterministic_algorithms(False)
    truth = float64_truth(case)
    return errors("v1" + (" deterministic" if deterministic else ""), dtype, case, gpu, cpu, truth)


def compare_v2(seed: int, dtype: torch.dtype, method: str, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(1, 5, (1,), generator=g))
    shapes = [tuple(int(x) for x in torch.randint(1, 30, (2,), generator=g)) for _ in range(L)]
    points = [int(x) for x in torch.randint(0, 7, (L,), generator=g)]
    points[0] = max(points[0], 1)
    case = make_case_v2(2, int(torch.randint(1, 200, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g)),
                        int(torch.randint(1, 300, (1,), generator=g)), shapes, points, method, seed=seed,
                        value_dtype=dtype)
    cpu = run_op_v2(msda.ms_deform_attn_v2, case)
    gpu_case = type(case)(*(on(t, device) for t in (case.value, case.spatial_shapes, case.level_start_index,
                                                     case.sampling_locations, case.attention_weights,
                                                     case.grad_output)), case.points, case.method)
    gpu = run_op_v2(msda.ms_deform_attn_v2, gpu_case)
    return errors(f"v2 {method}", dtype, case, gpu, cpu, float64_truth_v2(case))


def errors(name, dtype, case, gpu, cpu, truth) -> dict:
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    gpu_all, cpu_all, truth_all = (gpu[0], *gpu[1]), (cpu[0], *cpu[1]), (truth[0], *truth[1])
    return {
        "op": name, "dtype": str(dtype).split(".")[1], "shape": list(case.value.shape),
        "cuda_vs_float64": {n: max_error(a, t) for n, a, t in zip(names, gpu_all, truth_all)},
        "cpu_vs_float64": {n: max_error(a, t) for n, a, t in zip(names, cpu_all, truth_all)},
        "cuda_vs_cpu": {n: max_error(a, b) for n, a, b in zip(names, gpu_all, cpu_all)},
    }


# A comparison fails when CUDA is further from float64 than this (relative to
# the largest magnitude), or more than 4x further than the CPU kernel plus this.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-3}


def verdict(row: dict) -> bool:
    tol = TOLERANCE[row["dtype"]]
    return all(row["cuda_vs_float64"][k] <= max(tol, 4 * row["cpu_vs_float64"][k] + tol) for k in row["cuda_vs_float64"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tests-json", help="the pytest summary gpu_check.sh wrote, merged into the JSON")
    parser.add_argument("--cases", type=int, default=6, help="random cases per (op, dtype)")
    parser.add_argument("--quick", action="store_true", help="small benchmark shapes")
    parser.add_argument("--device", default="cuda",
                        help="cpu: exercise this script without a GPU (the CPU kernels against themselves)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    comparisons = []
    for dtype in DTYPES:
        for seed in range(args.cases):
            comparisons.append(compare_v1(seed, dtype, False, args.device))
            comparisons.append(compare_v1(seed, dtype, True, args.device))
            for method in ("default", "discrete"):
                comparisons.append(compare_v2(seed, dtype, method, args.device))
    for row in comparisons:
        row["ok"] = verdict(row)
    failed = [r for r in comparisons if not r["ok"]]
    print(f"gpu_check: {len(comparisons) - len(failed)} of {len(comparisons)} comparisons within tolerance", flush=True)
    bench_cases = benchmark_cases(args.quick, args.device)
    report = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                    "cuda": torch.version.cuda, "torch": torch.__version__, "cpu": cpu_model(), "python": platform.python_version(),
                    "msda_kernel_devices": sorted(msda._extension.KERNEL_DEVICES)},
        "tests": json.load(open(args.tests_json)) if args.tests_json and os.path.exists(args.tests_json) else None,
        "comparisons": comparisons,
        "comparisons_failed": len(failed),
        "benchmark": bench_cases,
        "elapsed_s": time.time() - t0,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"gpu_check: wrote {args.out}")
    return 1 if failed else 0


def benchmark_cases(quick: bool, device_name: str) -> list[dict]:
    bench, timing = benchmark_module("cases"), benchmark_module("timing")
    device = torch.device(device_name)
    rows = []
    for name, case in (bench.QUICK_OP_CASES if quick else bench.OP_CASES).items():
        inputs = bench.make_op_inputs(case, device)
        args = [inputs[k] for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations",
                                    "attention_weights")]
        for impl, op in (("msda", msda.ms_deform_attn), ("reference", msda.ms_deform_attn_reference)):
            with torch.no_grad():
                fwd = timing.time_calls(lambda: op(*args), device, warmup=3, repeats=10)
            leaves = [t.detach().clone().requires_grad_() for t in (args[0], args[3], args[4])]
            step = timing.forward_and_backward(lambda: op(leaves[0], args[1], args[2], leaves[1], leaves[2]),
                                               inputs["grad_output"], leaves)
            both = timing.time_calls(step, device, warmup=3, repeats=10)
            rows.append({"case": name, "dims": case.dims(), "impl": impl, "forward_ms": 1e3 * fwd["median_s"],
                         "forward_backward_ms": 1e3 * both["median_s"]})
            print(f"{name:14} {impl:9} forward {rows[-1]['forward_ms']:8.3f} ms  "
                  f"fwd+bwd {rows[-1]['forward_backward_ms']:8.3f} ms", flush=True)
    for row in rows:
        if row["impl"] == "msda":
            ref = next(r for r in rows if r["case"] == row["case"] and r["impl"] == "reference")
            row["forward_speedup"] = ref["forward_ms"] / row["forward_ms"]
            row["forward_backward_speedup"] = ref["forward_backward_ms"] / row["forward_backward_ms"]
    return rows


def benchmark_module(name: str):
    """benchmarks/<name>.py, imported by path: tests/ has a cases.py of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"msda_benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
