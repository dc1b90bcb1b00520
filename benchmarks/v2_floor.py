"""The floor under the v2 discrete forward, on v2_bench.py's own inputs: how
long fetching the sampled rows of value takes with nothing else, against msda's
discrete forward and the reference on the same inputs.

    python benchmarks/v2_floor.py [--rounds 41] [--out benchmarks/results/v2_floor]

Needs g++ with OpenMP (it compiles benchmarks/gather_floor.cpp with
-march=native into a shared library). For each points layout of v2_bench.py,
the pixel each sample reads (the kernels' rule: trunc(loc * size + 0.5),
clamped), in the kernels' item order; the floor adds each row times its
weight into its query-head's output at the benchmark's threads. Each round
calls, in turn: the floor "cold" (after writing 64 MiB of other memory: in a
model, and in v2_bench.py where the reference's calls run in between, value is
no longer in cache when the op runs) and "warm" (right after), msda the same
two ways, and the reference. Times are medians over the rounds, ratios the
median of the rounds' own ratios: on a machine whose speed drifts, separate
runs of each would compare different moments. The floor's speed-up over the
reference is a ceiling for any kernel that reads the same rows.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from other_work import OtherWork, describe  # noqa: E402
from results_io import write_results  # noqa: E402
from v2_bench import LEVELS, LQ, M, N, D, POINTS, make_inputs  # noqa: E402

JUNK_BYTES = 64 << 20


def sample_rows(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(row offsets in floats, weights), both (N * Lq * M, points): each sample's one pixel of value."""
    loc, attn, value = inputs["sampling_locations"], inputs["attention_weights"], inputs["value"]
    batch, _, heads, T, _ = loc.shape
    S = value.shape[1]
    shapes = inputs["spatial_shapes"]
    starts = inputs["level_start_index"]
    per_level = [int(x) for x in inputs["points"]]
    level = torch.repeat_interleave(torch.arange(len(per_level)), torch.tensor(per_level))
    H, W = shapes[level, 0], shapes[level, 1]

    def index(coord: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        v = coord * size.float() + 0.5  # the product rounded, then the addition (as the kernels)
        return torch.minimum(v.clamp(min=0).trunc().long(), size - 1)

    ix, iy = index(loc[..., 0], W), index(loc[..., 1], H)  # (N, Lq, M, T)
    pixel = starts[level] + iy * W + ix
    n = torch.arange(batch).view(batch, 1, 1, 1)
    m = torch.arange(heads).view(1, 1, heads, 1)
    rows = ((n * S + pixel) * heads + m) * D
    return rows.reshape(-1, T).to(torch.int32), attn.reshape(-1, T).float()


def load_floor(workdir: str):
    """gather_floor.cpp compiled into a shared library: its gather_sweep, typed for ctypes."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SystemExit("v2_floor.py needs g++ to compile benchmarks/gather_floor.cpp")
    library = os.path.join(workdir, "gather_floor.so")
    subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                    os.path.join(HERE, "gather_floor.cpp"), "-o", library], check=True)
    sweep = ctypes.CDLL(library).gather_sweep
    sweep.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int]
    sweep.restype = None
    return sweep


def measure(points: list[int], sweep, threads: int, rounds: int, junk: torch.Tensor) -> dict:
    """Per round, in turn: the floor cold and warm, msda cold and warm, the reference; medians over the rounds,
    and the median of the rounds' own ratios (the machine's speed drifts between rounds, less within one)."""
    import msda

    inputs = make_inputs(points) | {"points": points}
    rows, weights = sample_rows(inputs)
    value = inputs["value"]
    out = torch.empty(rows.shape[0], D)
    args = (value, inputs["spatial_shapes"], inputs["level_start_index"], inputs["sampling_locations"],
            inputs["attention_weights"], points, "discrete")
    calls = {
        "floor": lambda: sweep(value.data_ptr(), rows.data_ptr(), weights.data_ptr(), rows.shape[0], rows.shape[1],
                               out.data_ptr(), threads),
        "msda": lambda: msda.ms_deform_attn_v2(*args),
    }
    times: dict[str, list[float]] = {f"{name} {kind}": [] for name in calls for kind in ("cold", "warm")}
    times["reference"] = []
    with torch.no_grad():
        for fn in (*calls.values(), lambda: msda.ms_deform_attn_v2_reference(*args)):
            fn()  # warm-up: page faults, first-call costs
        for i in range(rounds):
            for name, fn in calls.items():
                junk.fill_(i)  # value leaves the cache, as between a model's layers
                start = time.perf_counter()
                fn()
                times[f"{name} cold"].append(time.perf_counter() - start)
                start = time.perf_counter()
                fn()
                times[f"{name} warm"].append(time.perf_counter() - start)
            start = time.perf_counter()
            msda.ms_deform_attn_v2_reference(*args)
            times["reference"].append(time.perf_counter() - start)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    return {
        "points": points,
        "samples": rows.numel(),
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "round_s": times,
        "msda_over_floor": {"cold": ratio("msda cold", "floor cold"), "warm": ratio("msda warm", "floor warm")},
        "speedup_over_reference": {"msda cold": ratio("reference", "msda cold"),
                                   "floor cold": ratio("reference", "floor cold"),
                                   "floor warm": ratio("reference", "floor warm")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "v2_floor"),
                        help="path without extension (default benchmarks/results/v2_floor)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from run_all import machine_info

    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    other_work = OtherWork()
    junk = torch.empty(JUNK_BYTES // 4)
    with tempfile.TemporaryDirectory() as tmp:
        sweep = load_floor(tmp)
        rows = []
        for points in POINTS:
            row = measure(points, sweep, args.threads, args.rounds, junk)
            rows.append(row)
            t = row["median_s"]
            print(f"{str(points):10} floor cold {t['floor cold'] * 1e3:.3f} ms, warm {t['floor warm'] * 1e3:.3f}; "
                  f"msda cold {t['msda cold'] * 1e3:.3f}, warm {t['msda warm'] * 1e3:.3f}; "
                  f"reference {t['reference'] * 1e3:.2f} ms", flush=True)
    report = {
        "benchmark": "v2_floor",
        "date_utc": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/v2_floor.py " + " ".join(sys.argv[1:]),
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "other_work_cores": other_work.cores(),
        "threads": args.threads,
        "rounds": args.rounds,
        "shape": {"N": N, "Lq": LQ, "M": M, "D": D, "levels": LEVELS},
        "rows": rows,
    }
    text = markdown(report)
    print(text)
    write_results(args.out, report, text)
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    la = lambda v: ", ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [
        "# The v2 discrete forward against the floor of its row fetches",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['msda_build']}; {r['threads']} threads. Load average at "
        f"start {la(m['load_average_at_start'])}, at end {la(m['load_average_at_end'])}; "
        f"{describe(r['other_work_cores'])}. {r['date_utc']}. Command: `{r['command'].strip()}`.",
        "",
        f"Shape: v2_bench.py's (N {r['shape']['N']}, Lq {r['shape']['Lq']}, M {r['shape']['M']}, D "
        f"{r['shape']['D']}, levels {', '.join(f'{h}x{w}' for h, w in r['shape']['levels'])}), float32. Floor: "
        "gather_floor.cpp fetches each sample's row and adds it times its weight, nothing else. Cold: after "
        "writing 64 MiB of other memory (as in a model, and in v2_bench.py between the reference's calls); warm: "
        f"right after a call. {r['rounds']} rounds, each calling the floor, msda and the reference in turn: times "
        "are medians over the rounds, ratios the median of the rounds' own ratios.",
        "",
        "| points | floor cold ms | floor warm ms | msda cold ms | msda warm ms | reference ms | msda / floor, "
        "cold | msda cold speed-up | floor cold speed-up (ceiling) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        t, sp = row["median_s"], row["speedup_over_reference"]
        lines.append(f"| {row['points']} | {t['floor cold'] * 1e3:.3f} | {t['floor warm'] * 1e3:.3f} | "
                     f"{t['msda cold'] * 1e3:.3f} | {t['msda warm'] * 1e3:.3f} | {t['reference'] * 1e3:.2f} | "
                     f"{row['msda_over_floor']['cold']:.2f} | {sp['msda cold']:.1f}x | {sp['floor cold']:.1f}x |")
    lines += ["", "## Reading it", ""]
    for row in r["rows"]:
        sp = row["speedup_over_reference"]
        lines.append(f"* {row['points']}: msda's forward takes {row['msda_over_floor']['cold']:.2f}x the floor's "
                     f"cold and {row['msda_over_floor']['warm']:.2f}x warm. Fetching the rows alone allows at most "
                     f"{sp['floor cold']:.1f}x over the reference when value starts outside the cache, "
                     f"{sp['floor warm']:.1f}x when it is in cache.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
