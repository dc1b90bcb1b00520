"""16-bit against float32 on the CPU: time and working memory per dtype.

Timing: one process, the dtypes side by side. Round after round, the dtypes
run forward (under ``torch.no_grad``) one after the other, then forward+backward,
in an order that reverses every round; each measurement is the median of
``--calls`` calls (more for short calls: at least 50 ms of them, so that a
sub-millisecond decoder forward is not judged on a few milliseconds of a
shared machine). The time per dtype is the median over rounds. The speedup of
a dtype is the median over rounds of float32's time over its time in the same
round: a machine whose speed drifts over minutes (a shared VM) then moves
both sides of each ratio alike.

Memory: each dtype in a fresh process (worker.py --dtype), on the very first
full-size forward+backward: peak RSS growth (memory.py states the method).
"working" subtracts what every implementation returns (the output and the
three gradients, in their dtypes), which no implementation can avoid.

    python benchmarks/dtype_bench.py [--cases encoder_n1 decoder] [--rounds 15] [--calls 5]

Prints a table, writes benchmarks/results/dtype_bench.json (machine, load
averages at start and end, method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import msda  # noqa: E402
from cases import OP_CASES, QUICK_OP_CASES, make_op_inputs  # noqa: E402
from dispatch_vs_native import machine  # noqa: E402
from other_work import RunRecord  # noqa: E402
from timing import forward_and_backward, time_calls  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
CPU = torch.device("cpu")


def closures(case_name: str, dtype: torch.dtype, quick: bool = False):
    x = make_op_inputs((QUICK_OP_CASES if quick else OP_CASES)[case_name], CPU, dtype)
    leaves = [x[k].requires_grad_(True) for k in ("value", "sampling_locations", "attention_weights")]
    args = [x[k] for k in ARGS]

    def forward() -> None:
        with torch.no_grad():
            msda.ms_deform_attn(*args)

    return forward, forward_and_backward(lambda: msda.ms_deform_attn(*args), x["grad_output"], leaves)


MIN_ROUND_S = 0.05  # seconds of calls per round and measurement, at least
MAX_CALLS = 200


def time_side_by_side(cases: list[str], rounds: int, calls: int, quick: bool = False) -> dict:
    results: dict = {}
    for case in cases:
        fns = {name: closures(case, dtype, quick) for name, dtype in DTYPES.items()}
        samples = {name: {"forward": [], "forward_backward": []} for name in DTYPES}
        # Calls per round: at least `calls`, and enough for MIN_ROUND_S of calls, so that a sub-millisecond
        # call (the decoder forward) is not judged on a few milliseconds of a shared machine.
        count: dict = {name: {} for name in DTYPES}
        for name, (fwd, step) in fns.items():  # warm-up: page faults, thread pools
            for kind, fn in (("forward", fwd), ("forward_backward", step)):
                once = time_calls(fn, CPU, 2, 1)["median_s"]
                count[name][kind] = max(calls, min(MAX_CALLS, math.ceil(MIN_ROUND_S / max(once, 1e-9))))
        names = list(DTYPES)
        for round_index in range(rounds):
            order = names if round_index % 2 == 0 else names[::-1]  # no dtype always first or last
            for kind in ("forward", "forward_backward"):
                for name in order:
                    fn = fns[name][0 if kind == "forward" else 1]
                    samples[name][kind].append(time_calls(fn, CPU, 1, count[name][kind])["median_s"])
        results[case] = summarize(samples, count)
    return results


def summarize(samples: dict, count: dict) -> dict:
    """Per dtype and pass: the median over rounds; per 16-bit dtype, the median of the rounds' own
    float32 / dtype ratios (and the ratios themselves)."""
    row: dict = {}
    for name in samples:
        row[name] = {kind: {"median_s": statistics.median(s), "round_medians_s": s,
                            "calls_per_round": count[name][kind]}
                     for kind, s in samples[name].items()}
    for name in samples:
        if name != "float32":
            ratios = {kind: [a / b for a, b in zip(samples["float32"][kind], samples[name][kind])]
                      for kind in ("forward", "forward_backward")}
            row[name]["round_speedups_vs_float32"] = ratios
            row[name]["speedup_vs_float32"] = {kind: statistics.median(r) for kind, r in ratios.items()}
    return row


def returned_bytes(case_name: str, dtype: torch.dtype, quick: bool = False) -> int:
    """The output and the three gradients every implementation hands back."""
    c = (QUICK_OP_CASES if quick else OP_CASES)[case_name]
    size = torch.tensor([], dtype=dtype).element_size()
    out = c.N * c.Lq * c.M * c.D
    grads = c.N * c.S * c.M * c.D + c.N * c.Lq * c.M * c.L * c.P * 3  # value, locations (x, y), weights
    return (out + grads) * size


def memory_per_dtype(case: str, impls: list[tuple[str, str]], quick: bool = False) -> list[dict]:
    rows = []
    for impl, dtype in impls:
        cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--case", case, "--impl", impl, "--dtype", dtype,
               "--threads", "2", "--warmup", "0", "--repeats", "1"] + (["--quick"] if quick else [])
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        mem = json.loads(out.strip().splitlines()[-1])["memory"]
        ret = returned_bytes(case, DTYPES[dtype], quick)
        rows.append({"case": case, "impl": impl, "dtype": dtype, "peak_extra_bytes": mem["peak_extra_bytes"],
                     "returned_bytes": ret, "working_bytes": max(mem["peak_extra_bytes"] - ret, 0),
                     "method": mem["method"]})
    reference = next((r for r in rows if r["impl"] == "reference"), None)
    for r in rows:
        if reference is not None and r["impl"] == "msda":
            # The reference computes 16-bit inputs in float32: its float32 figure is its smallest.
            r["fraction_of_reference_float32_peak"] = r["peak_extra_bytes"] / max(reference["peak_extra_bytes"], 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["encoder_n1", "decoder"], choices=sorted(OP_CASES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of the plumbing, not a measurement")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "dtype_bench.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error(f"--rounds and --calls must be at least 1, got {args.rounds} and {args.calls}")
    torch.set_num_threads(args.threads)
    record = RunRecord("dtype_bench.py", argv)
    timings = time_side_by_side(args.cases, args.rounds, args.calls, args.quick)
    print(f"{'case':12} {'dtype':9} {'forward ms':>11} {'fwd+bwd ms':>11} {'fwd x f32 (rounds)':>19} "
          f"{'f+b x f32 (rounds)':>19}")
    for case, row in timings.items():
        for name in DTYPES:
            r = row[name]
            cells = []
            for kind in ("forward", "forward_backward"):
                ratios = r.get("round_speedups_vs_float32", {}).get(kind)
                cells.append(f"{r['speedup_vs_float32'][kind]:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                             if ratios else "1.00")
            print(f"{case:12} {name:9} {r['forward']['median_s'] * 1e3:11.2f} "
                  f"{r['forward_backward']['median_s'] * 1e3:11.2f} {cells[0]:>19} {cells[1]:>19}")
    memory = []
    if not args.no_memory:
        memory = memory_per_dtype("encoder_n1", [("reference", "float32")] + [("msda", d) for d in DTYPES], args.quick)
        print(f"\n{'impl':10} {'dtype':9} {'peak MiB':>9} {'returned':>9} {'working':>9} {'x ref f32':>10}")
        for m in memory:
            frac = m.get("fraction_of_reference_float32_peak")
            print(f"{m['impl']:10} {m['dtype']:9} {m['peak_extra_bytes'] / 2**20:9.1f} "
                  f"{m['returned_bytes'] / 2**20:9.1f} {m['working_bytes'] / 2**20:9.1f} "
                  f"{'' if frac is None else f'{frac:.3f}':>10}")
    report = {
        **record.fields(),
        "machine": machine(),
        "threads": args.threads,
        "quick": args.quick,
        "msda_cpu_capability": msda._extension.EXTENSION.cpu_capability(),
        "timing_method": f"one process; {args.rounds} rounds, in each the dtypes one after the other for the forward, "
                         f"then for forward+backward, their order reversed every round; per round the median "
                         f"of {args.calls} calls, or more for short calls (at least {MIN_ROUND_S} s of calls, at most "
                         f"{MAX_CALLS}: calls_per_round); times are medians over rounds, speedups the median of the "
                         f"rounds' own float32 / dtype ratios (round_speedups_vs_float32); forward under no_grad",
        "memory_method": "fresh process per (implementation, dtype), first full-size forward+backward (worker.py); "
                         "working = peak - output and gradients returned",
        "timings": timings,
        "memory": memory,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
