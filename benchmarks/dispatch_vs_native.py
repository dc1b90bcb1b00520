"""Runtime CPU dispatch against a build for the machine (-march=native).

Two builds of msda cannot be loaded into one process (both register the
`msda` op library), so each measurement is a fresh process that imports one
build (``PYTHONPATH=<build>/src``) and times forward and forward+backward on
the encoder shape; the builds alternate round after round, so that load from
other work on the machine falls on both alike. The ratio is of the medians
over rounds (each round's own figure is the median of its repeated calls).

    python benchmarks/dispatch_vs_native.py --build dispatched=. --build native=/tmp/msda-native \\
        [--capability avx512] [--rounds 6] [--case encoder_n1]

The native build is today's -march=native build of the sources before runtime
dispatch (e.g. `git archive <commit> | tar -x -C /tmp/msda-native` and
`python setup.py build_ext --inplace` there). Prints a table, writes JSON
(benchmarks/results/dispatch_vs_native.json) with the machine description.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Runs inside each measuring process: one build, one case, one JSON line.
WORKER = r"""
import json, os, sys
sys.path.insert(0, {here!r})
import torch
import msda
from msda import _extension
from cases import OP_CASES, make_op_inputs
from timing import forward_and_backward, time_calls
case = OP_CASES[{case!r}]
x = make_op_inputs(case, torch.device("cpu"))
args = [x[k] for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")]
leaves = [x["value"], x["sampling_locations"], x["attention_weights"]]
for t in leaves:
    t.requires_grad_(True)
def forward():
    with torch.no_grad():
        return msda.ms_deform_attn(*args)
fwd = time_calls(forward, torch.device("cpu"), warmup=3, repeats={repeats})
step = forward_and_backward(lambda: msda.ms_deform_attn(*args), x["grad_output"], leaves)
fb = time_calls(step, torch.device("cpu"), warmup=2, repeats={repeats})
ext = _extension.EXTENSION
path = ext.cpu_capability() if hasattr(ext, "cpu_capability") else ext.vector_path()
print(json.dumps({{"path": path, "forward_s": fwd["median_s"], "fwd_bwd_s": fb["median_s"]}}))
"""


def machine() -> dict:
    import platform

    info: dict = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        pass
    if hasattr(os, "getloadavg"):  # other work on the machine skews the timings: record it
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    return info


def measure(src: str, case: str, repeats: int, capability: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=src, MSDA_REQUIRE_EXTENSION="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("MSDA_CPU_CAPABILITY", None)
    if capability:
        env["MSDA_CPU_CAPABILITY"] = capability
    code = WORKER.format(here=HERE, case=case, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(prog="dispatch_vs_native.py", description=__doc__.split("\n")[0])
    p.add_argument("--build", action="append", required=True, metavar="NAME=DIR",
                   help="a source tree built in place (its src/ holds msda with _C); the first is the one compared")
    p.add_argument("--capability", default=None, help="MSDA_CPU_CAPABILITY for the builds that dispatch")
    p.add_argument("--case", default="encoder_n1")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(HERE, "results", "dispatch_vs_native.json"))
    a = p.parse_args()
    builds = [b.split("=", 1) for b in a.build]
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    runs: dict[str, list[dict]] = {name: [] for name, _ in builds}
    for r in range(a.rounds):
        order = builds if r % 2 == 0 else builds[::-1]
        for name, tree in order:
            runs[name].append(measure(os.path.join(os.path.abspath(tree), "src"), a.case, a.repeats, a.capability))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{n} fwd {runs[n][-1]['forward_s'] * 1e3:.1f} ms, f+b {runs[n][-1]['fwd_bwd_s'] * 1e3:.1f} ms"
            for n, _ in builds), flush=True)

    summary = {}
    for name, _ in builds:
        summary[name] = {
            "path": runs[name][0]["path"],
            "forward_ms": statistics.median(x["forward_s"] for x in runs[name]) * 1e3,
            "fwd_bwd_ms": statistics.median(x["fwd_bwd_s"] for x in runs[name]) * 1e3,
        }
    first = builds[0][0]
    print(f"\n{a.case}, medians over {a.rounds} alternating rounds of {a.repeats} calls each")
    print(f"{'build':<12} {'CPU path':<10} {'forward ms':>11} {'fwd+bwd ms':>11} {'fwd ratio':>10} {'f+b ratio':>10}")
    for name, s in summary.items():
        s["forward_ratio_to_" + first] = s["forward_ms"] / summary[first]["forward_ms"]
        s["fwd_bwd_ratio_to_" + first] = s["fwd_bwd_ms"] / summary[first]["fwd_bwd_ms"]
        print(f"{name:<12} {s['path']:<10} {s['forward_ms']:>11.2f} {s['fwd_bwd_ms']:>11.2f} "
              f"{s['forward_ratio_to_' + first]:>10.3f} {s['fwd_bwd_ratio_to_' + first]:>10.3f}")
    report = {"case": a.case, "rounds": a.rounds, "repeats": a.repeats, "capability": a.capability,
              "builds": dict(builds), "summary": summary, "runs": runs, "machine": machine(),
              "load_average_at_start": load_at_start,
              "method": "fresh process per measurement, builds alternating (order reversed every other round); "
                        "per round the median of the repeats; the figure is the median over rounds",
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
