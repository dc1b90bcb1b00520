"""Runs the whole benchmark suite: msda's kernels against the grid_sample reference.

    python benchmarks/run_all.py                 # full run (about 7 minutes on 2 cores)
    python benchmarks/run_all.py --quick         # smoke run on tiny shapes
    python benchmarks/run_all.py --only encoder_n1 decoder --repeats 7

Every (case, implementation, device) runs in its own process (worker.py), so
that each peak-memory figure starts from a clean process. msda and the
reference of one case run back to back, so that load on a shared machine
affects both alike. Writes benchmark.json, benchmark.md and speedup.png into
--out (benchmarks/results by default; benchmarks/results/quick with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import msda  # noqa: E402
from msda import _extension  # noqa: E402
from cases import OP_CASES  # noqa: E402
from module_bench import MODULE_CASES  # noqa: E402
from plot import plot_speedups  # noqa: E402
from other_work import OtherWork  # noqa: E402
from report import check_targets, compare_rounds, markdown  # noqa: E402
from roofline import machine_peaks  # noqa: E402

ALL_CASES = list(OP_CASES) + list(MODULE_CASES)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    build = _extension.BUILD_INFO
    build_info = {k: getattr(build, k) for k in dir(build) if k.isupper()} if build is not None else {}
    if build is None:
        summary = "extension not built"
    else:
        summary = f"built with {build_info.get('COMPILER')}"
        if build_info.get("CPU_FLAGS"):
            summary += f", extra flags {build_info['CPU_FLAGS']}"
        if not _extension.AVAILABLE:
            summary += f"; NOT loaded ({_extension.UNAVAILABLE_REASON})"
        else:
            summary += f"; CPU kernels: {_extension.EXTENSION.cpu_capability()}"
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "msda_version": msda.__version__,
        "msda_build": summary,
        "msda_build_info": build_info,
        "msda_kernel_devices": sorted(_extension.KERNEL_DEVICES),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def run_worker(case: str, impl: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    is_reference = impl == "reference"
    threads = [args.threads]
    # Thread scaling (msda at 1 thread too). Not for the 6-layer stack: its time is mostly
    # torch's matmuls, and a 1-thread pass would add minutes.
    if (device == "cpu" and args.threads != 1 and (not is_reference or args.reference_scaling)
            and case != "encoder_stack"):
        threads.append(1)
    if is_reference:
        repeats = args.module_reference_repeats if case in MODULE_CASES else args.reference_repeats
        warmup = args.reference_warmup
    else:
        repeats, warmup = args.repeats, args.warmup
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--case", case, "--impl", impl, "--device", device,
           "--threads", *map(str, threads), "--warmup", str(warmup), "--repeats", str(repeats)]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when the worker's torch loads
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(map(shlex.quote, cmd))}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    t = result["timings"][str(args.threads)]
    print(f"  {case:14s} {impl:9s} {device:4s} fwd {t['forward']['median_s'] * 1e3:9.2f} ms  "
          f"fwd+bwd {t['forward_backward']['median_s'] * 1e3:9.2f} ms  "
          f"peak extra {result['memory']['peak_extra_bytes'] / 2**20:8.1f} MiB  ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run")
    parser.add_argument("--only", nargs="+", choices=ALL_CASES, help="run only these cases")
    parser.add_argument("--out", help="output folder (default benchmarks/results, or benchmarks/results/quick)")
    parser.add_argument("--repeats", type=int, help="timed runs per msda measurement (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int,
                        help="warm-up runs for msda (default 5: the allocator only settles after a few large "
                             "allocations, and the first calls pay page faults; 1 with --quick)")
    parser.add_argument("--reference-repeats", type=int,
                        help="timed runs per reference measurement, op cases (default 5)")
    parser.add_argument("--module-reference-repeats", type=int,
                        help="timed runs per reference measurement, module cases (default 3: a 6-layer "
                             "fwd+bwd takes about 20 s)")
    parser.add_argument("--reference-warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds per case: msda's and the reference's worker processes alternate this many times "
                             "each; speed-ups are the median of the rounds' ratios (3 or more on a shared machine, "
                             "whose speed drifts between the two sides of a single round)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the main comparison (msda is also "
                        "timed at 1 thread for scaling)")
    parser.add_argument("--reference-scaling", action="store_true",
                        help="also time the reference at 1 thread (slow: doubles the reference's time)")
    parser.add_argument("--omp-wait-policy", default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                        choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY of the workers (default: yours, else PASSIVE: threads that spin while "
                             "they wait slow everything else on a shared machine; README \"OMP_WAIT_POLICY\")")
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even when a GPU is present")
    parser.add_argument("--render-only", metavar="JSON",
                        help="measure nothing: rebuild the rows, tables and plot from the raw measurements "
                             "in an earlier benchmark.json (e.g. after a change to the report)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    defaults = {"repeats": (2, 5), "warmup": (1, 5), "reference_repeats": (2, 5), "module_reference_repeats": (2, 3)}
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    if args.out is None:
        args.out = os.path.join(HERE, "results", "quick") if args.quick else os.path.join(HERE, "results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.render_only:
        with open(args.render_only) as f:
            write_outputs(json.load(f), args.out)
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    devices = ["cpu"]
    if not args.no_cuda and torch.cuda.is_available():
        devices.append("cuda")
    machine = machine_info()
    other_work = OtherWork()
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"msda {machine['msda_build']}", flush=True)
    peaks = machine_peaks(args.threads, quick=args.quick)
    print(f"peaks at {args.threads} threads: matmul {peaks['measured']['gflops']:.0f} GFLOP/s, "
          f"copy {peaks['measured']['copy_gbps']:.1f} GB/s", flush=True)

    raw = []
    for case in args.only or ALL_CASES:
        for device in devices:
            for round_index in range(args.rounds):
                # Alternating which goes first, so that neither side always follows the other's calls.
                for impl in ("msda", "reference") if round_index % 2 == 0 else ("reference", "msda"):
                    raw.append({**run_worker(case, impl, device, args), "round": round_index})

    report = {
        "started_utc": started.isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - t0,
        "load_average_at_end": os.getloadavg(),
        "other_work_cores": other_work.cores(),
        "settings": {
            "command": " ".join(["python benchmarks/run_all.py",
                                 *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "reference_repeats": args.reference_repeats, "module_reference_repeats": args.module_reference_repeats,
            "reference_warmup": args.reference_warmup, "reference_scaling": args.reference_scaling,
            "rounds": args.rounds,
            "devices": devices, "omp_wait_policy": args.omp_wait_policy,
        },
        "machine": machine,
        "peaks": peaks,
        "raw": raw,
    }
    write_outputs(report, args.out)
    return 0


def write_outputs(report: dict[str, Any], out: str) -> None:
    """Derive rows and target verdicts from the raw measurements; write JSON, markdown and plot."""
    raw, threads = report["raw"], report["settings"]["threads"]
    rows = compare_rounds(raw, threads, report["peaks"])
    report["flop_formula"] = "forward = 10*N*Lq*M*L*P*D; forward+backward = 3 * forward"
    report["rows"] = rows
    # A smoke run's ratios come from tiny shapes and two repeats: no verdicts on them.
    report["targets"] = [] if report["settings"]["quick"] else check_targets(rows)
    json_path = os.path.join(out, "benchmark.json")
    md_path = os.path.join(out, "benchmark.md")
    png_path = os.path.join(out, "speedup.png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(md_path, "w") as f:
        f.write(text)
    title = f"msda vs grid_sample reference, {report['machine']['cpu_model']}, {threads} threads"
    plotted = plot_speedups(rows, png_path, title + (" (--quick)" if report["settings"]["quick"] else ""))
    print()
    print(text)
    print(f"wrote {json_path}, {md_path}" + (f", {png_path}" if plotted else
                                             " (no plot: matplotlib is not installed)"))
    if report["settings"]["quick"]:
        print("--quick: a smoke run; its numbers are not measurements (run without --quick to measure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
