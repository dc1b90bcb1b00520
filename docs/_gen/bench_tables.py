"""Markdown tables generated from benchmarks/results/*.json, so that no figure in
the documentation or the README is copied by hand.

* The documentation site: ``<!-- bench: NAME -->`` in a page is replaced by
  ``render(NAME)`` when MkDocs builds (docs/_gen/hooks.py).
* README.md: the block between ``<!-- results:start -->`` and
  ``<!-- results:end -->`` is ``readme_block()``;
  ``python docs/_gen/bench_tables.py --write-readme`` rewrites it after new
  measurements, ``--check`` exits 1 when it is stale (a test runs the check).

Every table is followed by the command that produced the file, the machine the
file records and the date it records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# The command that writes each file (a file that records its own command wins).
COMMANDS = {
    "benchmark.json": "python benchmarks/run_all.py",
    "v2_bench.json": "python benchmarks/v2_bench.py",
    "v2_bench_v1_check.json": "python benchmarks/v2_bench.py --v1-check --baseline-src <another build>/src",
    "hf_detr.json": "python benchmarks/hf_detr.py --split",
    "hf_detr_split.json": "python benchmarks/hf_detr.py --split-only",
    "dtype_bench.json": "python benchmarks/dtype_bench.py",
    "detr_inference.json": "python benchmarks/detr_inference.py",
    "onnx_detr.json": "python benchmarks/onnx_detr.py",
    "dispatch_vs_native.json": "python benchmarks/dispatch_vs_native.py",
    "omp_wait_policy.json": "python benchmarks/omp_wait_policy.py",
    "row_cost.json": "python benchmarks/row_cost.py",
}


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _commit_date(name: str) -> str | None:
    """The day the file was last committed: older result files record no date of their own."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", f"benchmarks/results/{name}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _date(data: dict[str, Any], name: str | None = None) -> str:
    for key in ("date_utc", "started_utc"):
        for scope in (data, data.get("machine") or {}, data.get("settings") or {}):
            if scope.get(key):
                return str(scope[key])[:10]
    committed = _commit_date(name) if name else None
    if committed:
        return f"{committed} (committed; the file records no date)"
    return "not recorded in the file"


def _machine(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    cpu = m.get("cpu_model") or "CPU model not recorded"
    cores = m.get("cores") or m.get("cpu_count") or data.get("cpu_count")
    parts = [cpu + (f", {cores} cores" if cores else "")]
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    load_avg = m.get("load_average_at_start") or m.get("load_average_1_5_15min") or data.get("load_average_start")
    if load_avg:
        parts.append(f"load average {load_avg[0]:.1f} at the start")
    if data.get("other_work_cores") is not None:  # benchmarks/other_work.py
        parts.append(f"other processes used {data['other_work_cores']:.2f} cores during the run")
    return "; ".join(parts)


def source_line(name: str, data: dict[str, Any]) -> str:
    command = ((data.get("settings") or {}).get("command") or data.get("command") or COMMANDS[name]).strip()
    return (f"Command: `{command}` · machine: {_machine(data)} · date: {_date(data, name)} · "
            f"data: `benchmarks/results/{name}`")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _x(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 100 else f"{ratio:.0f}x"


def _case_name(row: dict[str, Any]) -> str:
    d = row["dims"]
    return f"{row['case']} (N {d['N']}, Lq {d['Lq']}, S {d['S']}, M {d['M']}, D {d['D']}, L {d['L']}, P {d['P']})"


def op_table(data: dict[str, Any], cases: list[str] | None = None) -> str:
    rows = []
    for r in data["rows"]:
        if "reference" not in r or (cases and r["case"] not in cases):
            continue
        m, ref = r["msda"], r["reference"]
        rows.append([
            _case_name(r) if r["kind"] == "op" else f"{r['case']} ({r['kind']})",
            f"{_ms(m['forward_s'])} / {_ms(ref['forward_s'])}", _x(r["speedup_forward"]),
            f"{_ms(m['forward_backward_s'])} / {_ms(ref['forward_backward_s'])}", _x(r["speedup_forward_backward"]),
            f"{m['peak_extra_bytes'] / 2**20:.0f} / {ref['peak_extra_bytes'] / 2**20:.0f}",
        ])
    return _table(["case", "forward ms (msda / reference)", "speed-up", "forward+backward ms (msda / reference)",
                   "speed-up", "peak extra MiB (msda / reference)"], rows)


def v2_table(data: dict[str, Any]) -> str:
    rows = [[str(r["points"]), r["method"], r["pass"], f"{r['msda_ms']:.2f}", f"{r['reference_ms']:.2f}",
             _x(r["speedup"])] for r in data["rows"]]
    return _table(["points per level", "method", "pass", "msda ms", "reference ms", "speed-up"], rows)


def dtype_table(data: dict[str, Any]) -> str:
    rows = []
    for case, by_dtype in data["timings"].items():
        for dtype, r in by_dtype.items():
            sp = r.get("speedup_vs_float32", {"forward": 1.0, "forward_backward": 1.0})
            rows.append([case, dtype, _ms(r["forward"]["median_s"]), _ms(r["forward_backward"]["median_s"]),
                         f"{sp['forward']:.2f}x", f"{sp['forward_backward']:.2f}x"])
    return _table(["case", "dtype", "forward ms", "forward+backward ms", "forward vs float32",
                   "forward+backward vs float32"], rows)


def v2_v1_check_table(data: dict[str, Any]) -> str:
    rows = [[r["pass"], f"{r['before_ms']:.2f}", f"{r['after_ms']:.2f}", f"{r['after_over_before']:.3f}"]
            for r in data["rows"]]
    return _table(["pass", "v1 before the v2 op (ms)", "v1 with the v2 op (ms)", "ratio"], rows)


def hf_table(data: dict[str, Any]) -> str:
    rows = []
    for c in data["cases"]:
        med = c["median_seconds"]
        fmt = _ms if med["transformers"] < 1 else (lambda s: f"{s:.2f} s")
        unit = " ms" if med["transformers"] < 1 else ""
        rows.append([c["case"], fmt(med["transformers"]) + unit, fmt(med["msda"]) + unit, _x(c["speedup"]["msda"])])
    return _table(["case", "transformers", "transformers + `msda_hf.enable()`", "speed-up"], rows)


def detr_inference_table(data: dict[str, Any]) -> str:
    med = data["median_seconds"]
    size = "x".join(str(s) for s in data["input"][2:])
    return _table(["model", "input", "msda kernels", "reference op", "speed-up", "max output difference"],
                  [[data["model"], size, f"{med['msda kernels']:.2f} s", f"{med['reference op']:.2f} s",
                    _x(data["speedup"]), f"{data['max_abs_output_diff']:.1e}"]])


def onnx_table(data: dict[str, Any]) -> str:
    rows = [[r["size"], f"{r['pytorch_s']:.2f} s", f"{r['onnxruntime_s']:.2f} s", f"{r['onnxruntime_over_pytorch']:.2f}",
             f"{r['max_abs_diff']['pred_logits']:.1e}", f"{r['max_abs_diff']['pred_boxes']:.1e}"] for r in data["rows"]]
    return _table(["image", "PyTorch + msda", f"onnxruntime {data.get('onnxruntime', '')}".strip(),
                   "onnxruntime / PyTorch", "max diff logits", "max diff boxes"], rows)


def dispatch_table(data: dict[str, Any]) -> str:
    s = data["summary"]
    rows = [[name, s[name]["path"], f"{s[name]['forward_ms']:.1f}", f"{s[name]['fwd_bwd_ms']:.1f}"]
            for name in ("dispatched", "native")]
    return _table(["build", "kernel path", "forward ms", "forward+backward ms"], rows)


def omp_table(data: dict[str, Any]) -> str:
    med = data["median_step_ms"]
    rows = [[f"`{k}`" if k != "None" else "unset", f"{v / 1e3:.2f} s"] for k, v in med.items()]
    return _table(["OMP_WAIT_POLICY", "one demo training step (median)"], rows)


def row_cost_table(data: dict[str, Any]) -> str:
    rows = [[str(t["D"]), t["dtype"], "in L1 (all points near one spot)" if t["rows_in_l1"] else "encoder",
             str(t["row_bytes"]), _ms(t["median_s"]), f"{t['ns_per_sample']:.2f}"] for t in data["timings"].values()]
    table = _table(["D", "dtype", "rows", "bytes per row", "ms per forward", "ns per sample"], rows)
    threads = f"{data['threads']} thread{'s' if data['threads'] != 1 else ''}"
    return f"{table}\n\nAt D 32 ({threads}):\n\n" + "\n".join(data["summary"])


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "op": ("benchmark.json", op_table),
    "v2": ("v2_bench.json", v2_table),
    "dtype": ("dtype_bench.json", dtype_table),
    "v2_v1_check": ("v2_bench_v1_check.json", v2_v1_check_table),
    "hf_detr": ("hf_detr.json", hf_table),
    "detr_inference": ("detr_inference.json", detr_inference_table),
    "onnx_detr": ("onnx_detr.json", onnx_table),
    "dispatch": ("dispatch_vs_native.json", dispatch_table),
    "omp": ("omp_wait_policy.json", omp_table),
    "row_cost": ("row_cost.json", row_cost_table),
}


def render(name: str) -> str:
    """A table and, under it, the command, machine and date of its JSON file."""
    file, make = TABLES[name]
    data = load(file)
    return f"{make(data)}\n\n{source_line(file, data)}\n"


def readme_block() -> str:
    """The README's short results table: one line per headline figure."""
    op, v2, hf = load("benchmark.json"), load("v2_bench.json"), load("hf_detr.json")
    rows = []
    for r in op["rows"]:
        if r["case"] in ("encoder_n1", "decoder") and "reference" in r:
            rows.append([f"op, {r['case']} shape, forward / forward+backward",
                         f"{_x(r['speedup_forward'])} / {_x(r['speedup_forward_backward'])}",
                         f"`{source_cmd('benchmark.json', op)}`", _machine_date(op)])
    for r in v2["rows"]:
        if r["points"] == [3, 6, 3] and r["pass"] == "forward":
            rows.append([f"v2 op, points {r['points']}, {r['method']}, forward", _x(r["speedup"]),
                         f"`{source_cmd('v2_bench.json', v2)}`", _machine_date(v2)])
    for c in hf["cases"]:
        if c["case"].startswith(("inference", "training")):
            rows.append([f"transformers Deformable DETR, {c['case']}", _x(c["speedup"]["msda"]),
                         f"`{source_cmd('hf_detr.json', hf)}`", _machine_date(hf)])
    # msda's own 16-bit kernels against its float32 kernel, and its share of a whole model.
    dtypes = load("dtype_bench.json")
    # The decoder's forward+backward is left out: its full-size float32 grad_value buffer is the same in
    # every dtype (docs/benchmarks.md says why).
    for case, kind, label in (("encoder_n1", "forward", "forward"),
                              ("encoder_n1", "forward_backward", "forward+backward"),
                              ("decoder", "forward", "forward")):
        row = dtypes["timings"].get(case)
        if row:
            rows.append([f"op, {case} shape, {label}: bfloat16 / float16 against msda's float32",
                         " / ".join(f'{row[d]["speedup_vs_float32"][kind]:.2f}x' for d in ("bfloat16", "float16")),
                         f"`{source_cmd('dtype_bench.json', dtypes)}`", _machine_date(dtypes)])
    split = load("hf_detr_split.json")
    for c in split["cases"]:
        if "msda_share" in c:
            rows.append(["msda's share of a transformers Deformable DETR inference at 800x1333 (lower is better)",
                         f"{c['msda_share']:.1%}", f"`{source_cmd('hf_detr_split.json', split)}`",
                         _machine_date(split)])
    table = _table(["what (measured in one run)", "figure", "command", "machine, date"], rows)
    return f"{START}\n{table}\n{END}"


def source_cmd(name: str, data: dict[str, Any]) -> str:
    return ((data.get("settings") or {}).get("command") or data.get("command") or COMMANDS[name]).strip()


def _machine_date(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    cores = m.get("cores") or m.get("cpu_count")
    return f"{m.get('cpu_model', 'CPU not recorded')}{f', {cores} cores' if cores else ''}, {_date(data)}"


def readme_is_current(text: str) -> bool:
    return readme_block() in text


def write_readme() -> None:
    text = README.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    README.write_text(text[:start] + readme_block() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-readme"]:
        write_readme()
    elif sys.argv[1:] == ["--check"]:
        if not readme_is_current(README.read_text()):
            sys.exit("README.md's results block is stale: python docs/_gen/bench_tables.py --write-readme")
    else:
        for name in TABLES:
            print(f"## {name}\n\n{render(name)}")
