"""The limit model of the CPU kernels on the Deformable DETR encoder shape:
what this machine could do, measured, against what msda does.

    python benchmarks/limit_model.py [--repeats 5] [--out benchmarks/results/limit_model]

Needs g++ and an AVX-512 CPU (it compiles benchmarks/line_cost.cpp with
-march=native). In one run, on the encoder_n1 case of the benchmark suite
(N 1, Lq = S = 22223, M 8, D 32, L 4, P 4: 2.84 M samples):

1. the sample set: every sample's 4 bilinear corner rows and weights, computed
   from the benchmark's own locations, in the op's item order (query, head);
2. the floor (line_cost.cpp, one core, best of 5): the cycles per sample of
   nothing but a sample's data movement (forward: 8 x 64-byte loads and 8
   multiply-adds; backward: 16 loads, 8 stores, 16 multiply-adds and 4 lane
   sums), on the real rows and on rows that stay in L1, in several orders,
   and the backward as msda's tasks run it (per head: its rows copied into a
   dense buffer, its items, its grad rows copied out); the core clock, L1
   and L2 load bandwidth, and the sample set's reuse profile (distinct lines a
   sample needs that the last W items did not touch);
3. msda and the grid_sample reference on the same inputs, interleaved, at the
   benchmark's threads (forward, forward+backward), and msda at 1 thread;
4. the model: msda's cycles per sample against the floor's, and the speedup
   over the reference each would give, next to the goals (50x forward, 40x
   forward+backward).

The floor leaves out everything but data movement of value and grad_value:
coordinate arithmetic, bounds checks, the location gradient's extra dot
products, reading the locations, weights and grad_output, per-call costs.
So msda's cycles minus the floor's are what the kernel spends on those, and
the floor's speedup is an upper bound no kernel of this design can pass.
Prints a table and writes JSON and markdown with the machine and the load
average at start and end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from other_work import OtherWork, describe  # noqa: E402
from results_io import write_results  # noqa: E402

CASE = "encoder_n1"
GOALS = {"forward": 50.0, "forward+backward": 40.0}
MSDA_FLOOR = "floor, msda's orders (forward in strips, backward on dense head copies)"
LINE_BYTES = 64


def corner_samples(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each sample's 4 corner offsets (in floats: row * M * D + m * D) and weights
    (bilinear x attention; 0 for a corner outside the map, whose row is then
    clamped into the map), in item order (n, q, m), samples of an item in
    (level, point) order. Bilinear as grid_sample with align_corners=False."""
    value, shapes, starts = inputs["value"], inputs["spatial_shapes"], inputs["level_start_index"]
    loc, attn = inputs["sampling_locations"].float(), inputs["attention_weights"].float()
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    H = shapes[:, 0].view(1, 1, 1, L, 1)
    W = shapes[:, 1].view(1, 1, 1, L, 1)
    start = starts.view(1, 1, 1, L, 1)
    x = loc[..., 0] * W - 0.5
    y = loc[..., 1] * H - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    heads = torch.arange(M).view(1, 1, M, 1, 1)
    rows, weights = [], []
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        cx, cy = x0 + dx, y0 + dy
        inside = (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
        row = start + cy.clamp(min=0).minimum(H - 1) * W + cx.clamp(min=0).minimum(W - 1)
        rows.append((row * M + heads) * D)
        weights.append(torch.where(inside, w * attn, torch.zeros(())))
    rows_t = torch.stack(rows, -1).reshape(-1, 4).to(torch.int32)
    weights_t = torch.stack(weights, -1).reshape(-1, 4).float()
    return rows_t, weights_t, L * P


def forward_query_order(inputs: dict) -> torch.Tensor:
    """The order in which the CPU forward visits the queries of image 0
    (csrc/cpu/query_order.h): by the vertical strip of the x of each query's
    first point (head 0, level 0, point 0), strips about 32 pixels wide on the
    widest level (1 to 64 of them), then by query; outside [0, 1) or NaN: the
    nearest edge strip."""
    widest = int(inputs["spatial_shapes"][:, 1].max())
    strips = min(max(widest // 32, 1), 64)
    x = inputs["sampling_locations"][0, :, 0, 0, 0, 0].float() * strips
    strip = torch.nan_to_num(x, nan=0.0).clamp(0, strips - 1).floor().long()
    return torch.sort(strip, stable=True).indices


def write_samples(path: str, rows: torch.Tensor, weights: torch.Tensor, per_item: int, value_floats: int,
                  heads: int, query_order: torch.Tensor) -> None:
    with open(path, "wb") as f:
        header = [rows.shape[0], value_floats, per_item, heads, query_order.numel()]
        f.write(torch.tensor(header, dtype=torch.int64).numpy().tobytes())
        f.write(rows.contiguous().numpy().tobytes())
        f.write(weights.contiguous().numpy().tobytes())
        f.write(query_order.to(torch.int64).contiguous().numpy().tobytes())


def run_floor(sample_path: str, workdir: str) -> dict:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SystemExit("limit_model.py needs g++ to compile benchmarks/line_cost.cpp")
    binary = os.path.join(workdir, "line_cost")
    subprocess.run([compiler, "-O3", "-march=native", os.path.join(HERE, "line_cost.cpp"), "-o", binary], check=True)
    out = subprocess.run([binary, sample_path], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_ops(inputs: dict, repeats: int, threads: int) -> dict:
    import msda
    from v2_bench import interleaved_medians

    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = [inputs[k] for k in names]
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in args]

    def closures(fn):
        def fwd():
            with torch.no_grad():
                fn(*args)

        def fb():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(inputs["grad_output"])

        return fwd, fb

    msda_f, msda_fb = closures(msda.ms_deform_attn)
    ref_f, ref_fb = closures(msda.ms_deform_attn_reference)
    torch.set_num_threads(threads)
    t = interleaved_medians({"msda forward": msda_f, "reference forward": ref_f, "msda forward+backward": msda_fb,
                          "reference forward+backward": ref_fb}, warmup=2, repeats=repeats)
    torch.set_num_threads(1)
    t1 = interleaved_medians({"msda forward": msda_f, "msda forward+backward": msda_fb}, warmup=2, repeats=repeats)
    torch.set_num_threads(threads)
    return {"threads": threads, "seconds": t, "seconds_1_thread": t1}


def model(floor: dict, ops: dict, samples: int) -> dict:
    """Cycles per sample of each (floor, msda, goal) and the speedup over the reference each gives."""
    hz, threads = floor["clock_hz"], ops["threads"]
    t, t1 = ops["seconds"], ops["seconds_1_thread"]
    ref = {"forward": t["reference forward"], "forward+backward": t["reference forward+backward"]}

    def cycles_all_cores(seconds: float) -> float:  # core cycles per sample, both cores busy
        return seconds * threads * hz / samples

    def speedup(cycles: dict) -> dict:  # the speedup over the reference that these cycles per sample give
        f = cycles["forward"]
        fb = cycles["forward"] + cycles["backward"]
        return {"forward": ref["forward"] / (f * samples / (threads * hz)),
                "forward+backward": ref["forward+backward"] / (fb * samples / (threads * hz))}

    def floor_cycles(order: str, rows: str) -> dict:
        return {k: floor["orders"][order][f"{k}_s_per_sample"][rows] * hz for k in ("forward", "backward")}

    # msda's backward as its tasks run (line_cost.cpp: time_backward_head_tasks): per head, its rows copied in,
    # its items, its grad rows copied out. Older floors lack it: then the full-size dense copies stand in.
    tasks = head_task_cycles(floor)
    msda_backward_floor = (tasks["items"] + tasks["copies"] if tasks
                           else floor_cycles("head-major, dense head copies", "rows")["backward"])

    msda_1 = {"forward": t1["msda forward"] * hz / samples,
              "backward": (t1["msda forward+backward"] - t1["msda forward"]) * hz / samples}
    msda_n = {"forward": cycles_all_cores(t["msda forward"]),
              "backward": cycles_all_cores(t["msda forward+backward"] - t["msda forward"])}
    goal_f = cycles_all_cores(ref["forward"] / GOALS["forward"])
    goal = {"forward": goal_f, "backward": cycles_all_cores(ref["forward+backward"] / GOALS["forward+backward"]) - goal_f}
    rows = {
        "floor, L1-resident rows (instructions only)": floor_cycles("query-major", "l1_ring"),
        "floor, encoder rows, query-major (value as laid out)": floor_cycles("query-major", "rows"),
        "floor, encoder rows, query-major in strips (msda's forward)": floor_cycles("query-major, strips", "rows"),
        "floor, encoder rows, head-major (value as laid out)": floor_cycles("head-major", "rows"),
        "floor, encoder rows, head-major on dense head copies (msda's backward)" if not tasks else
        "floor, encoder rows, head-major on full-size dense head copies (all made first)":
            floor_cycles("head-major, dense head copies", "rows"),
        MSDA_FLOOR: {"forward": floor_cycles("query-major, strips", "rows")["forward"],
                     "backward": msda_backward_floor},
        "goal: 50x forward, 40x forward+backward": goal,
        "msda, 1 thread": msda_1,
        f"msda, {threads} threads": msda_n,
    }
    return {name: {"cycles_per_sample": c, "speedup_over_reference": speedup(c)} for name, c in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="path without extension (default benchmarks/results/limit_model)")
    parser.add_argument("--quick", action="store_true", help="the tiny encoder shape of run_all.py --quick: a smoke "
                        "run, not a measurement (default out: benchmarks/results/quick/limit_model)")
    args = parser.parse_args()
    if args.out is None:
        args.out = os.path.join(HERE, "results", *(["quick"] if args.quick else []), "limit_model")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    from cases import OP_CASES, QUICK_OP_CASES, make_op_inputs
    from roofline import measured_peaks
    from run_all import machine_info

    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    other_work = OtherWork()
    case = (QUICK_OP_CASES if args.quick else OP_CASES)[CASE]
    inputs = make_op_inputs(case, torch.device("cpu"))
    rows, weights, per_item = corner_samples(inputs)
    samples = rows.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.bin")
        write_samples(path, rows, weights, per_item, inputs["value"].numel(), case.M, forward_query_order(inputs))
        del rows, weights
        floor = run_floor(path, tmp)
    ops = time_ops(inputs, args.repeats, args.threads)
    try:
        from msda import _C

        msda_clock = _C.measure_clock_hz()  # what roofline.py's derived peaks use
    except (ImportError, AttributeError):
        msda_clock = None
    peaks = measured_peaks(args.threads, quick=args.quick)
    result_model = model(floor, ops, samples)
    hz = floor["clock_hz"]
    report = {
        "benchmark": "limit_model",
        "date_utc": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/limit_model.py " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "case": case.dims() | {"samples": samples, "name": CASE},
        "method": "floor: benchmarks/line_cost.cpp replays each sample's loads, multiply-adds and stores (no "
                  "coordinate arithmetic) on one core, best of 5 sweeps; cycles = seconds x measured clock; msda and "
                  "the reference: medians of interleaved calls in this process; cycles per sample at N threads = "
                  "seconds x N x clock / samples; a speedup = reference seconds / the seconds those cycles take",
        "machine": machine,
        "clock_hz": hz,
        "clock_hz_multiply_chain": floor["clock_hz_multiply_chain"],
        "clock_hz_msda_measure_clock_hz": msda_clock,
        "hardware": {
            "l1_load_bytes_per_cycle": floor["load_bytes_per_cycle"]["l1_16KiB"],
            "l2_load_bytes_per_cycle": floor["load_bytes_per_cycle"]["l2_1MiB"],
            "memory_copy_gbps": peaks["copy_gbps"],
            "matmul_gflops": peaks["gflops"],
        },
        "per_sample": {
            "lines_touched_forward": 8, "bytes_loaded_forward": 8 * LINE_BYTES,
            "lines_touched_backward": 16, "bytes_loaded_backward": 16 * LINE_BYTES, "bytes_stored_backward": 8 * LINE_BYTES,
            "new_lines_not_touched_in_last_w_items": {
                order: v["new_lines_per_sample"] for order, v in floor["orders"].items()},
        },
        "floor_raw": floor,
        "ops": ops,
        "model": result_model,
        "load_average_at_end": list(os.getloadavg()),
        "other_work_cores": other_work.cores(),
    }
    report["machine"]["load_average_at_end"] = report["load_average_at_end"]
    text = markdown(report)
    print(text)
    write_results(args.out, report, text)
    return 0


PASSES = ("forward", "backward")


def head_task_cycles(floor: dict) -> dict | None:
    """Cycles per sample of msda's backward tasks in the floor: {"items", "copies"}, or None (older floors)."""
    tasks = floor.get("backward_head_tasks_s_per_sample")
    return {k: v * floor["clock_hz"] for k, v in tasks.items()} if tasks else None


def reading(model_rows: dict, threads: int, head_tasks: dict | None = None) -> list[str]:
    """The model's bullet points, worded from its figures: a floor that msda beats on some machine is said
    not to bound that pass there, and a goal below the floor is said to be out of reach, instead of
    reporting negative cycles to spare. head_tasks: the floor's {"items", "copies"} cycles of msda's
    backward tasks, when measured (then the backward's floor counts its copies)."""
    msda = model_rows[f"msda, {threads} threads"]["cycles_per_sample"]
    goal = model_rows["goal: 50x forward, 40x forward+backward"]["cycles_per_sample"]
    floor = model_rows[MSDA_FLOOR]["cycles_per_sample"]
    floor_speedup = model_rows[MSDA_FLOOR]["speedup_over_reference"]
    query_major = model_rows["floor, encoder rows, query-major (value as laid out)"]["cycles_per_sample"]
    to_drop = [x for x in PASSES if msda[x] > goal[x]]
    gap = "; ".join(
        [f"its {x} must drop from {msda[x]:.1f} to {goal[x]:.1f} cycles per sample (by {msda[x] - goal[x]:.1f})"
         for x in to_drop]
        + [f"its {x} is already under the goal ({msda[x]:.1f} against {goal[x]:.1f})"
           for x in PASSES if x not in to_drop])
    beaten = [x for x in PASSES if msda[x] < floor[x]]
    spends = " and ".join(f"{msda[x] - floor[x]:.1f} more {x}" if x not in beaten
                          else f"{floor[x] - msda[x]:.1f} fewer {x}" for x in PASSES)
    bullets = [
        f"* To reach the goals at {threads} threads, {gap}.",
        "* msda's forward visits a query's 8 heads at a time on value as laid out, the queries in vertical "
        "strips (query_order.h); its backward works on one head at a time on a dense copy of its rows "
        f"(head_copies.h). The same data movement in those orders takes {floor['forward']:.1f} (forward) and "
        f"{floor['backward']:.1f} (backward) cycles per sample "
        + (f"(the backward as its tasks run it: per head, its rows copied in, its items, its grad rows copied out; "
           f"the items {head_tasks['items']:.1f}, the copies {head_tasks['copies']:.1f})" if head_tasks else
           "(the backward's copies, about 2 passes over value per call, not included)")
        + f"; msda takes {spends}."
        + (f" In the {' and the '.join(x for x in PASSES if x not in beaten)} the rest is coordinate arithmetic, "
           "corner weights and bounds, the location gradient's dot products, reading the locations, weights "
           "and grad_output, " + ("" if head_tasks else "the head copies, ") + "per-call costs "
           "(and any imperfect scaling over threads)." if len(beaten) < 2 else ""),
    ]
    one = model_rows.get("msda, 1 thread", {}).get("cycles_per_sample")
    if one and threads != 1:
        bullets.append(
            f"* At 1 thread (back to back) msda takes {one['forward']:.1f} forward and {one['backward']:.1f} backward: "
            + " and ".join(f"{one[x] / floor[x]:.2f}x the floor's {x}" for x in PASSES) + ".")
    for x in beaten:
        bullets.append(
            f"* msda's {x} takes fewer cycles than the floor's loop on this machine (msda's own loop moves the "
            "same rows faster than that loop does): here the floor is not a lower bound for the "
            f"{x}, and its speedups do not bound msda's.")
    for x in PASSES:
        if x in beaten:
            continue
        if goal[x] < floor[x]:
            bullets.append(
                f"* The {x} goal ({goal[x]:.1f} cycles per sample) is under the floor of this data movement "
                f"({floor[x]:.1f}): on this machine it needs fewer or better-placed lines (reuse in L1/L2), not "
                "less arithmetic.")
        else:
            bullets.append(
                f"* At the goal the {x} may spend {goal[x] - floor[x]:.1f} cycles per sample beyond the data "
                f"movement; it spends {msda[x] - floor[x]:.1f} now"
                + (": the data movement is half of msda's cycles or more, so fewer or better-placed lines are "
                   "what can help." if msda[x] <= 2 * floor[x] else ": the arithmetic, not memory, is where the "
                   "next cycles are."))
    if not beaten:
        bullets.append(
            f"* The floor's speedups are upper bounds for this design (no arithmetic at all): forward "
            f"{floor_speedup['forward']:.0f}x, forward+backward {floor_speedup['forward+backward']:.0f}x against "
            "the goals' 50x and 40x.")
    bullets.append(
        f"* In the op's memory order on value as laid out the data movement takes {query_major['forward']:.1f} and "
        f"{query_major['backward']:.1f} (msda's orders minus this: "
        f"{floor['forward'] - query_major['forward']:+.1f} / {floor['backward'] - query_major['backward']:+.1f}; "
        "negative: msda's orders move the data in fewer cycles).")
    return bullets


def markdown(r: dict) -> str:
    m, c, hw, ps = r["machine"], r["case"], r["hardware"], r["per_sample"]
    hz = r["clock_hz"]
    la = lambda v: ", ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [
        *(["**--quick: a smoke run on a tiny shape; its numbers are not measurements.**", ""] if r["quick"] else []),
        f"# Limit model: {c['name']} (N {c['N']}, Lq = S = {c['S']}, M {c['M']}, D {c['D']}, L {c['L']}, P {c['P']}: "
        f"{c['samples'] / 1e6:.2f} M samples), float32",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['msda_build']}; {r['ops']['threads']} threads. "
        f"Load average at start {la(m['load_average_at_start'])}, at end {la(r['load_average_at_end'])} (counting "
        "this run's own)"
        + (f"; {describe(r['other_work_cores'])}" if r.get("other_work_cores") is not None else "") + ". "
        f"{r['date_utc']}. Command: `{r['command'].strip()}`.",
        "",
        "## What the hardware does (measured)",
        "",
        f"* core clock {hz / 1e9:.2f} GHz (a chain of dependent register adds, one per cycle; a chain of "
        f"multiplies, 3 cycles each, gives {r['clock_hz_multiply_chain'] / 1e9:.2f} GHz)"
        + (f"; msda._C.measure_clock_hz() says {r['clock_hz_msda_measure_clock_hz'] / 1e9:.2f} GHz: it times "
           "immediate adds (`add $1, reg`), which cores that fold them while renaming run faster than one per "
           "cycle, so roofline.py's derived peaks and cycles use a wrong clock on such cores"
           if r.get("clock_hz_msda_measure_clock_hz") and abs(r["clock_hz_msda_measure_clock_hz"] / hz - 1) > 0.1
           else ""),
        f"* 64-byte loads: {hw['l1_load_bytes_per_cycle']:.0f} bytes/cycle from L1 (16 KiB), "
        f"{hw['l2_load_bytes_per_cycle']:.0f} bytes/cycle from L2 (1 MiB), per core",
        f"* memory copy {hw['memory_copy_gbps']:.0f} GB/s (read + write, {r['ops']['threads']} threads)",
        "",
        "## What a sample needs",
        "",
        f"* forward: 4 corner rows of D = 32 floats = {ps['lines_touched_forward']} lines, "
        f"{ps['bytes_loaded_forward']} bytes loaded (at 2 loads/cycle: 4 cycles)",
        f"* backward: those 8 lines of value again and 8 of grad_value read and written: "
        f"{ps['bytes_loaded_backward']} bytes loaded, {ps['bytes_stored_backward']} stored (at 1 store/cycle: 8 cycles)",
        "* distinct 64-byte lines a sample needs that the last W items did not touch (an item: one query's "
        "16 samples in one head; what must come from beyond L1 when W items' lines fit in it: "
        "48 KiB of L1 holds 768 lines), in the op's memory order (a query's 8 heads, then the next query), "
        "the same with the queries in vertical strips (the forward's order), head-major (one head's queries "
        "in memory order, then the next head), and head-major on dense per-head copies (the backward's):",
        "",
        "| order \\ W | " + " | ".join(next(iter(ps["new_lines_not_touched_in_last_w_items"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(ps["new_lines_not_touched_in_last_w_items"].values()))),
        *[f"| {order} | " + " | ".join(f"{v:.2f}" for v in by_w.values()) + " |"
          for order, by_w in ps["new_lines_not_touched_in_last_w_items"].items()],
        "",
        "## Cycles per sample and the speedup over the reference they give",
        "",
        f"Reference (grid_sample) in this run: forward {r['ops']['seconds']['reference forward'] * 1e3:.0f} ms, "
        f"forward+backward {r['ops']['seconds']['reference forward+backward'] * 1e3:.0f} ms at "
        f"{r['ops']['threads']} threads. Speedups assume {r['ops']['threads']} cores each doing the cycles shown. "
        f"msda at {r['ops']['threads']} threads is timed interleaved with the reference (as in a model, other work "
        "between calls), at 1 thread back to back; the floors run on one core, best of 5.",
        "",
        "| | fwd cycles | bwd cycles | fwd+bwd cycles | fwd speedup | fwd+bwd speedup |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in r["model"].items():
        cyc, sp = row["cycles_per_sample"], row["speedup_over_reference"]
        lines.append(f"| {name} | {cyc['forward']:.1f} | {cyc['backward']:.1f} | {cyc['forward'] + cyc['backward']:.1f} "
                     f"| {sp['forward']:.0f}x | {sp['forward+backward']:.0f}x |")
    lines += ["", "## Reading it", "", *reading(r["model"], r["ops"]["threads"], head_task_cycles(r["floor_raw"]))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
