"""Benchmark of the v2 op (RT-DETRv2 / D-FINE / DEIM decoder) against the
pure-PyTorch reference, and evidence that v1 is no slower.

    python benchmarks/v2_bench.py [--repeats 20] [--out benchmarks/results/v2_bench]
    python benchmarks/v2_bench.py --v1-check --baseline-src /path/to/other/build/src

Default mode: the decoder at 640x640 input (levels 80x80, 40x40, 20x20;
Lq 300, M 8, D 32, N 2) with points [4, 4, 4] and [3, 6, 3], both methods,
forward (no_grad) and forward+backward, msda and the reference timed
interleaved in the same process (the median of the repeats); prints a table
and writes JSON and markdown with the machine.

--v1-check: v1's op (msda.ms_deform_attn) on the v1 decoder shape (4 levels
of 4 points), timed in separate processes, alternating between this build's
src and --baseline-src (a build of the code before the v2 op), --rounds
times; reports the ratio of medians (the v1 op is untouched by the v2 op, so
expect noise only). Without --baseline-src it compares v1's op with the v2
op's uniform path (which calls v1's op).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from other_work import OtherWork, describe  # noqa: E402

LEVELS = ((80, 80), (40, 40), (20, 20))
N, LQ, M, D = 2, 300, 8, 32
POINTS = ([4, 4, 4], [3, 6, 3])
METHODS = ("default", "discrete")
TARGETS = {"forward": 10.0, "forward+backward": 4.0}
OFFSET_STD_PX = 2.0


def make_inputs(points: list[int], seed: int = 0) -> dict:
    """Decoder-like inputs: queries at random reference points, offsets of a few pixels."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    T = sum(points)
    levels = torch.repeat_interleave(torch.arange(len(points)), torch.tensor(points))
    wh = shapes.flip(-1).float()[levels]  # (T, 2)
    ref = torch.rand(N, LQ, 1, 1, 2, generator=g)
    loc = ref + torch.randn(N, LQ, M, T, 2, generator=g) * OFFSET_STD_PX / wh
    return {
        "value": torch.randn(N, int(sizes.sum()), M, D, generator=g),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": loc,
        "attention_weights": torch.softmax(torch.randn(N, LQ, M, T, generator=g), -1),
        "grad_output": torch.randn(N, LQ, M * D, generator=g),
    }


def closures(fn, inputs: dict, points: list[int], method: str):
    leaves = {k: inputs[k].clone().requires_grad_(k != "sampling_locations" or method == "default")
              for k in ("value", "sampling_locations", "attention_weights")}

    def call(value, loc, attn):
        return fn(value, inputs["spatial_shapes"], inputs["level_start_index"], loc, attn, points, method)

    def forward():
        with torch.no_grad():
            call(inputs["value"], inputs["sampling_locations"], inputs["attention_weights"])

    def forward_backward():
        for t in leaves.values():
            t.grad = None
        call(leaves["value"], leaves["sampling_locations"], leaves["attention_weights"]).backward(
            inputs["grad_output"])

    return forward, forward_backward


def interleaved_medians(fns: dict, warmup: int, repeats: int) -> dict:
    """Median seconds of each closure, the closures called in turn each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def machine() -> dict:
    from run_all import machine_info

    return machine_info()


def run_cases(args) -> dict:
    import msda

    rows = []
    for points in POINTS:
        inputs = make_inputs(points)
        for method in METHODS:
            msda_fwd, msda_fb = closures(msda.ms_deform_attn_v2, inputs, points, method)
            ref_fwd, ref_fb = closures(msda.ms_deform_attn_v2_reference, inputs, points, method)
            for which, pair in (("forward", (msda_fwd, ref_fwd)), ("forward+backward", (msda_fb, ref_fb))):
                t = interleaved_medians({"msda": pair[0], "reference": pair[1]}, args.warmup, args.repeats)
                speedup = t["reference"] / t["msda"]
                rows.append({
                    "points": points, "method": method, "pass": which,
                    "msda_ms": t["msda"] * 1e3, "reference_ms": t["reference"] * 1e3, "speedup": speedup,
                    "target": TARGETS[which], "meets_target": speedup >= TARGETS[which],
                })
                print(f"{str(points):10} {method:9} {which:17} msda {t['msda'] * 1e3:8.2f} ms  "
                      f"reference {t['reference'] * 1e3:8.2f} ms  {speedup:6.1f}x", flush=True)
    return {"rows": rows}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# v2 op benchmark (RT-DETRv2 / D-FINE decoder, 640x640 input)",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, {torch.get_num_threads()} threads; "
        f"{m['msda_build']}. Load average at start: {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}"
        + (f", at end: {', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}" if "load_average_at_end" in report
           else "") + (f"; {describe(report['other_work_cores'])}" if report.get("other_work_cores") is not None else "")
        + (f"; {report['date_utc']}" if "date_utc" in report else "") + ".",
        f"Shape: N {N}, Lq {LQ}, M {M}, D {D}, levels {', '.join(f'{h}x{w}' for h, w in LEVELS)}; float32; "
        f"median of {report['repeats']} interleaved calls each.",
        "",
        "| points | method | pass | msda ms | reference ms | speedup | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        verdict = "PASS" if r["meets_target"] else "FAIL"
        lines.append(f"| {r['points']} | {r['method']} | {r['pass']} | {r['msda_ms']:.2f} | {r['reference_ms']:.2f} "
                     f"| {r['speedup']:.1f}x | >= {r['target']:.0f}x {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ v1 check

def v1_worker(args) -> None:
    """In a fresh process: median seconds of v1's op (or v2's uniform path) on the v1 decoder shape."""
    import msda
    from cases import OP_CASES, make_op_inputs

    inputs = make_op_inputs(OP_CASES["decoder"], torch.device("cpu"))
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args_ = [inputs[k] for k in names]
    if args.worker == "v2-uniform":
        L, P = args_[3].shape[3], args_[3].shape[4]
        args_[3], args_[4] = args_[3].flatten(3, 4), args_[4].flatten(3, 4)

        def fn(*a):
            return msda.ms_deform_attn_v2(*a, [P] * L)
    else:
        fn = msda.ms_deform_attn
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in args_]

    def fwd():
        with torch.no_grad():
            fn(*args_)

    def fb():
        for t in leaves:
            if t.is_floating_point():
                t.grad = None
        fn(*leaves).backward(inputs["grad_output"])

    t = interleaved_medians({"forward": fwd, "forward+backward": fb}, args.warmup, args.repeats)
    print(json.dumps(t))


def v1_check(args) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    this_src = os.path.join(os.path.dirname(here), "src")
    variants = {"after": (this_src, "v1")}
    variants["before" if args.baseline_src else "v2-uniform"] = (
        (args.baseline_src, "v1") if args.baseline_src else (this_src, "v2-uniform"))
    samples = {name: {"forward": [], "forward+backward": []} for name in variants}
    for _ in range(args.rounds):
        for name, (src, worker) in variants.items():
            env = dict(os.environ, PYTHONPATH=src)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", worker, "--warmup",
                                  str(args.warmup), "--repeats", str(args.repeats)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            for k, v in json.loads(out.strip().splitlines()[-1]).items():
                samples[name][k].append(v)
    other = [n for n in variants if n != "after"][0]
    result = {"variants": {n: v[0] for n, v in variants.items()}, "samples_s": samples, "rows": []}
    for which in ("forward", "forward+backward"):
        after = statistics.median(samples["after"][which])
        base = statistics.median(samples[other][which])
        result["rows"].append({"pass": which, "after_ms": after * 1e3, f"{other}_ms": base * 1e3,
                               "after_over_" + other: after / base})
        print(f"v1 decoder {which:17} this build {after * 1e3:8.2f} ms  {other} {base * 1e3:8.2f} ms  "
              f"ratio {after / base:.3f}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "v2_bench"))
    parser.add_argument("--v1-check", action="store_true")
    parser.add_argument("--baseline-src", default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the core count)")
    parser.add_argument("--worker", choices=["v1", "v2-uniform"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        v1_worker(args)
        return 0
    other_work = OtherWork()
    report = {"machine": machine(), "repeats": args.repeats, "threads": torch.get_num_threads(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python benchmarks/v2_bench.py " + " ".join(sys.argv[1:])}
    if args.v1_check:
        report.update(v1_check(args))
        path = args.out + "_v1_check.json"
    else:
        report.update(run_cases(args))
        report["load_average_at_end"] = list(os.getloadavg())
        report["other_work_cores"] = other_work.cores()
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
        print(markdown(report))
        path = args.out + ".json"
    report["load_average_at_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
