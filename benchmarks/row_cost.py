"""What a sample of the CPU forward costs against the bytes of a value row, and
so what a 16-bit value can save: measured on the Deformable DETR encoder shape.

    python benchmarks/row_cost.py [--rounds 5] [--calls 5] [--threads 1]

Each bilinear sample (one point of one head) reads 4 corner rows of D
channels: D x 4 bytes each in float32, D x 2 in bfloat16 and float16. In one
process, configurations alternating round after round (the figure is the
median over rounds of each round's median of --calls forward calls, under
no_grad), it times the forward of:

* the encoder case (encoder_n1: N 1, Lq = S, M 8, L 4, P 4) with D of 16, 32
  and 64, in float32, bfloat16 and float16;
* the same case at D 32 with every sampling location near one point, so that
  the few rows the samples read stay in L1: what the forward spends on
  everything but fetching rows (coordinate arithmetic, weights, the loads and
  multiply-adds themselves).

From these it derives, for D 32 (the shape of Deformable DETR and its
relatives), per dtype: the shared part of a sample's time (rows in L1: the
same work in every dtype) and the part spent fetching rows (encoder minus
rows in L1; the locations and weights, read once per query in the dtype of
the case, count in the shared part). 16-bit rows halve the bytes; if that
halved the fetching part, 16-bit's forward speedup over float32 would be
float32's time over (16-bit's shared part + half of float32's fetching
part), the figure the summary gives next to the measured one. The D 16 and
D 64 rows show how the cost grows with the bytes per row.

Prints a table and writes benchmarks/results/row_cost.json and .md with the
machine, the load average at start and end, and the other work during the
run. Timings on a shared machine vary run to run; the ratios within one run
are the stable part.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import msda  # noqa: E402
from cases import OP_CASES, QUICK_OP_CASES, make_op_inputs  # noqa: E402
from dispatch_vs_native import machine  # noqa: E402
from other_work import RunRecord, describe  # noqa: E402
from results_io import write_results  # noqa: E402
from timing import time_calls  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WIDTHS = (16, 32, 64)
ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
CPU = torch.device("cpu")


def forward_call(D: int, dtype: torch.dtype, rows_in_l1: bool, quick: bool):
    """A no_grad forward on the encoder case with D channels per head, and its sample count."""
    base = (QUICK_OP_CASES if quick else OP_CASES)["encoder_n1"]
    case = dataclasses.replace(base, D=D)
    x = make_op_inputs(case, CPU, dtype)
    if rows_in_l1:
        # Every point within a hundredth of the map around (0.3, 0.3): a handful of rows per level.
        g = torch.Generator().manual_seed(1)
        loc = x["sampling_locations"]
        x["sampling_locations"] = (0.3 + 0.01 * torch.rand(loc.shape, generator=g)).to(loc.dtype)
    args = [x[k] for k in ARGS]

    def forward() -> None:
        with torch.no_grad():
            msda.ms_deform_attn(*args)

    samples = case.N * case.Lq * case.M * case.L * case.P
    return forward, samples


def configurations() -> list[tuple[str, int, str, bool]]:
    """(key, D, dtype, rows in L1) of every configuration timed."""
    rows = [(f"D{D} {name}", D, name, False) for D in WIDTHS for name in DTYPES]
    rows += [(f"D32 {name}, rows in L1", 32, name, True) for name in DTYPES]
    return rows


def measure(rounds: int, calls: int, quick: bool) -> dict:
    fns = {key: forward_call(D, DTYPES[name], in_l1, quick) for key, D, name, in_l1 in configurations()}
    for fn, _ in fns.values():  # warm-up: page faults, the thread pool
        time_calls(fn, CPU, 2, 1)
    per_round: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, (fn, _) in fns.items():
            per_round[key].append(time_calls(fn, CPU, 0, calls)["median_s"])
    out = {}
    for key, D, name, in_l1 in configurations():
        median = statistics.median(per_round[key])
        samples = fns[key][1]
        out[key] = {"D": D, "dtype": name, "rows_in_l1": in_l1, "row_bytes": D * DTYPES[name].itemsize,
                    "samples": samples, "median_s": median, "round_medians_s": per_round[key],
                    "ns_per_sample": median / samples * 1e9}
    return out


def derive(t: dict) -> dict:
    ns = {key: r["ns_per_sample"] for key, r in t.items()}
    shared = {name: ns[f"D32 {name}, rows in L1"] for name in DTYPES}
    fetching = {name: ns[f"D32 {name}"] - shared[name] for name in DTYPES}
    half_bytes = {name: ns["D32 float32"] / (shared[name] + fetching["float32"] / 2)
                  for name in DTYPES if name != "float32"}
    return {
        "speedup_vs_float32_d32": {name: ns["D32 float32"] / ns[f"D32 {name}"] for name in DTYPES if name != "float32"},
        "shared_ns_per_sample_d32": shared,
        "fetching_ns_per_sample_d32": fetching,
        "fetching_vs_float32_d32": {name: fetching[name] / fetching["float32"] for name in DTYPES},
        "bound_if_fetching_halved_d32": half_bytes,
        "float32_ns_per_sample_by_row_bytes": {t[f"D{D} float32"]["row_bytes"]: ns[f"D{D} float32"] for D in WIDTHS},
    }


def summary(d: dict) -> list[str]:
    """What the D 32 figures say, as markdown bullets (stored in the JSON for the docs' table)."""
    sp, shared, fetch = d["speedup_vs_float32_d32"], d["shared_ns_per_sample_d32"], d["fetching_ns_per_sample_d32"]
    bound, ratio = d["bound_if_fetching_halved_d32"], d["fetching_vs_float32_d32"]
    by_bytes = d["float32_ns_per_sample_by_row_bytes"]
    sizes = sorted(by_bytes)
    # Doubling the bytes of a row adds less than half the cost: the rows, not their bytes, set the price.
    follows_rows = all(by_bytes[2 * b] < 1.5 * by_bytes[b] for b in sizes if 2 * b in by_bytes)
    lines = [
        f"* 16-bit forward over float32, measured: bfloat16 {sp['bfloat16']:.2f}x, float16 {sp['float16']:.2f}x.",
        f"* Shared part (rows in L1), ns per sample: float32 {shared['float32']:.2f}, bfloat16 "
        f"{shared['bfloat16']:.2f}, float16 {shared['float16']:.2f}: coordinate arithmetic, weights, loads and "
        "multiply-adds, and for 16-bit the widening to float32 (and, in the AVX-512 kernel, its row prefetches).",
        f"* Fetching rows (encoder minus rows in L1): float32 {fetch['float32']:.2f}, bfloat16 "
        f"{fetch['bfloat16']:.2f} ({ratio['bfloat16']:.2f} of float32's), float16 {fetch['float16']:.2f} "
        f"({ratio['float16']:.2f}). In float32, rows of "
        + ", ".join(f"{b} bytes cost {v:.2f}" for b, v in by_bytes.items())
        + " ns per sample: "
        + ("the cost follows the rows more than their bytes." if follows_rows else "the cost grows with the bytes."),
    ]
    beaten = [name for name in ("bfloat16", "float16") if sp[name] > bound[name]]
    line = (f"* If 16-bit's fetching took exactly half of float32's (half the bytes), its speedup would be bfloat16 "
            f"{bound['bfloat16']:.2f}x, float16 {bound['float16']:.2f}x.")
    if beaten:
        line += (f" Measured beats that for {' and '.join(beaten)}: its rows cost less than half of float32's to "
                 "fetch, because the AVX-512 forward asks for 16-bit rows a few queries ahead (not float32's), "
                 "which hides their latency.")
    else:
        line += " Beyond that only a smaller shared part helps, and that speeds float32 alike."
    return lines + [line]


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Forward cost per sample against value row bytes: encoder_n1{' (quick: tiny shape)' if r['quick'] else ''}",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} cores; CPU kernels: "
        f"{r['msda_cpu_capability']}; {r['threads']} thread(s). Load average at start "
        f"{', '.join(map(str, r['load_average_at_start']))}, at end {', '.join(map(str, r['load_average_at_end']))} "
        f"(counting this run's own); {describe(r['other_work_cores'])}. {r['started_utc']}. "
        f"Command: `{r['command']}`.",
        "",
        f"Timing: {r['timing_method']}.",
        "",
        "| D | dtype | rows | bytes per row | ms per forward | ns per sample |",
        "|---|---|---|---|---|---|",
    ]
    for key, t in r["timings"].items():
        where = "in L1 (all points near one spot)" if t["rows_in_l1"] else "encoder"
        lines.append(f"| {t['D']} | {t['dtype']} | {where} | {t['row_bytes']} | {t['median_s'] * 1e3:.2f} | "
                     f"{t['ns_per_sample']:.2f} |")
    lines += ["", "## Reading it (D 32)", ""] + r["summary"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1 (default): no scheduling noise between 2 cores")
    parser.add_argument("--quick", action="store_true", help="tiny shape: a smoke run of the plumbing, not a measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "row_cost"), help="path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = RunRecord("row_cost.py", argv)
    timings = measure(args.rounds, args.calls, args.quick)
    report = {
        **record.fields(),
        "machine": machine(),
        "threads": args.threads,
        "quick": args.quick,
        "msda_cpu_capability": msda._extension.EXTENSION.cpu_capability(),
        "timing_method": f"one process; {args.rounds} rounds, configurations alternating within each; per round the "
                         f"median of {args.calls} forward calls under no_grad; the figure is the median over rounds",
        "timings": timings,
        "derived": derive(timings),
    }
    report["summary"] = summary(report["derived"])
    text = markdown(report)
    print(text)
    write_results(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
