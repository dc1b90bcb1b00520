"""Turns worker measurements into comparison rows, target verdicts and a markdown report."""

from __future__ import annotations

import copy
import statistics
from typing import Any

from other_work import describe
from roofline import op_flops, roofline_row

# (case, metric, threshold, description); metric "memory_ratio" must be <= 1/threshold,
# the speedups >= threshold. Ratios are msda against the reference, measured in the same run.
TARGETS: list[tuple[str, str, float, str]] = [
    ("encoder_n1", "speedup_forward", 40.0, "encoder N 1: forward >= 40x faster"),
    ("encoder_n1", "speedup_forward_backward", 32.0, "encoder N 1: fwd+bwd >= 32x faster"),
    ("encoder_n1", "memory_reduction", 10.0, "encoder N 1: peak extra memory <= 1/10 of the reference's"),
    ("decoder", "speedup_forward", 10.0, "decoder: forward >= 10x faster"),
    ("decoder", "speedup_forward_backward", 10.0, "decoder: fwd+bwd >= 10x faster"),
]

MIB = 2**20


def _median(result: dict[str, Any], threads: str, which: str) -> float:
    return result["timings"][threads][which]["median_s"]


def compare(msda_result: dict[str, Any], ref_result: dict[str, Any] | None, threads: int,
            peaks: dict[str, Any] | None) -> dict[str, Any]:
    """One row: msda against the reference at ``threads`` threads, plus msda's thread scaling."""
    t = str(threads)
    row: dict[str, Any] = {
        "case": msda_result["case"],
        "kind": msda_result["kind"],
        "device": msda_result["device"],
        "dims": msda_result["dims"],
        "threads": threads,
        "msda": {
            "forward_s": _median(msda_result, t, "forward"),
            "forward_backward_s": _median(msda_result, t, "forward_backward"),
            "peak_extra_bytes": msda_result["memory"]["peak_extra_bytes"],
        },
    }
    if ref_result is not None:
        row["reference"] = {
            "forward_s": _median(ref_result, t, "forward"),
            "forward_backward_s": _median(ref_result, t, "forward_backward"),
            "peak_extra_bytes": ref_result["memory"]["peak_extra_bytes"],
        }
        row["speedup_forward"] = row["reference"]["forward_s"] / row["msda"]["forward_s"]
        row["speedup_forward_backward"] = row["reference"]["forward_backward_s"] / row["msda"]["forward_backward_s"]
        row["memory_reduction"] = row["reference"]["peak_extra_bytes"] / max(row["msda"]["peak_extra_bytes"], 1)
    # Thread scaling: time at 1 thread over time at `threads`, for every thread count measured.
    row["scaling"] = {}
    for name, result in (("msda", msda_result), ("reference", ref_result)):
        if result is None or "1" not in result["timings"] or t not in result["timings"] or t == "1":
            continue
        row["scaling"][name] = {
            which: _median(result, "1", which) / _median(result, t, which) for which in ("forward", "forward_backward")
        }
    if row["kind"] == "op":
        flops = op_flops(row["dims"])
        for impl in ("msda", "reference"):
            if impl in row:
                row[impl]["gflops_forward"] = flops["forward"] / row[impl]["forward_s"] / 1e9
                row[impl]["gflops_forward_backward"] = flops["forward_backward"] / row[impl]["forward_backward_s"] / 1e9
        if peaks is not None and row["device"] == "cpu":
            row["roofline"] = roofline_row(row["dims"], row["msda"]["forward_s"], row["msda"]["forward_backward_s"],
                                           peaks)
    return row


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker result from several rounds' results: each timing and the memory peak their median."""
    merged = copy.deepcopy(results[0])
    for t, by_pass in merged["timings"].items():
        for which, timing in by_pass.items():
            timing["median_s"] = statistics.median(r["timings"][t][which]["median_s"] for r in results)
    merged["memory"]["peak_extra_bytes"] = statistics.median(r["memory"]["peak_extra_bytes"] for r in results)
    return merged


def compare_rounds(raw: list[dict[str, Any]], threads: int, peaks: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A row per (case, device), in the order of `raw`. With several rounds (run_all.py --rounds: the two
    implementations' worker processes alternating), times and memory are medians over the rounds, and
    each speed-up is the median of the rounds' own ratios (each round's msda and reference ran back to
    back, so a machine that slows down between rounds moves both sides of its ratio), its range kept in
    ``round_speedups``."""
    keys = list(dict.fromkeys((r["case"], r["device"]) for r in raw if r["impl"] == "msda"))
    rows = []
    for case, device in keys:
        mine = [r for r in raw if r["impl"] == "msda" and r["case"] == case and r["device"] == device]
        refs = [r for r in raw if r["impl"] == "reference" and r["case"] == case and r["device"] == device]
        row = compare(_merge_rounds(mine), _merge_rounds(refs) if refs else None, threads, peaks)
        if len(mine) > 1 and len(refs) == len(mine):
            per_round = [compare(m, r, threads, None) for m, r in zip(mine, refs)]
            row["round_speedups"] = {}
            for metric in ("speedup_forward", "speedup_forward_backward"):
                values = [pr[metric] for pr in per_round]
                row[metric] = statistics.median(values)
                row["round_speedups"][metric] = values
        rows.append(row)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    verdicts = []
    for case, metric, threshold, description in TARGETS:
        row = next((r for r in rows if r["case"] == case and r["device"] == "cpu" and metric in r), None)
        if row is None:
            continue
        value = row[metric]
        verdicts.append({"case": case, "metric": metric, "threshold": threshold, "value": value,
                         "description": description, "pass": value >= threshold})
    return verdicts


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _other_work(cores: float | None) -> str:
    """What other processes took while the benchmark ran (benchmarks/other_work.py)."""
    if cores is None:
        return describe(cores)
    return describe(cores) + " (0: the timings ran alone; other work slows both sides)"


def _load(averages: list[float]) -> str:
    return "/".join(f"{a:.1f}" for a in averages)


def _dims(d: dict[str, int]) -> str:
    text = f"N{d['N']} Lq{d['Lq']} M{d['M']} D{d['D']} L{d['L']} P{d['P']}"
    return text + (f" x{d['layers']} layers" if d.get("layers", 1) > 1 else "")


def _memory_ratio(msda_bytes: float, ref_bytes: float) -> str:
    """msda / reference as "1/x" when msda needs less; "-" when the reference's
    peak is too small to divide by (tiny shapes fit in memory already mapped)."""
    if ref_bytes <= MIB or msda_bytes < 0:
        return "-"
    ratio = msda_bytes / ref_bytes
    if ratio <= 0:
        return "0"
    return f"1/{1 / ratio:.1f}" if ratio < 1 else f"{ratio:.2f}"


def _speedup(row: dict[str, Any], metric: str) -> str:
    """The speed-up, and with several rounds the lowest and highest round's."""
    values = row.get("round_speedups", {}).get(metric)
    text = f"{row[metric]:.1f}x"
    return text + (f" ({min(values):.1f}-{max(values):.1f})" if values else "")


def _comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| case | shape | dev | fwd ms msda / ref | fwd speedup | fwd+bwd ms msda / ref | fwd+bwd speedup "
        "| peak extra MiB msda / ref | memory ratio | msda time 1 thread / 2 threads, fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, ref = r["msda"], r.get("reference")
        scale = r["scaling"].get("msda")
        scaling = f"{scale['forward']:.2f}x / {scale['forward_backward']:.2f}x" if scale else "-"
        if ref is None:
            cells = [f"{_ms(m['forward_s'])} / -", "-", f"{_ms(m['forward_backward_s'])} / -", "-",
                     f"{m['peak_extra_bytes'] / MIB:.1f} / -", "-"]
        else:
            cells = [
                f"{_ms(m['forward_s'])} / {_ms(ref['forward_s'])}", _speedup(r, "speedup_forward"),
                f"{_ms(m['forward_backward_s'])} / {_ms(ref['forward_backward_s'])}",
                _speedup(r, "speedup_forward_backward"),
                f"{m['peak_extra_bytes'] / MIB:.1f} / {ref['peak_extra_bytes'] / MIB:.1f}",
                _memory_ratio(m["peak_extra_bytes"], ref["peak_extra_bytes"]),
            ]
        lines.append(f"| {r['case']} | {_dims(r['dims'])} | {r['device']} | " + " | ".join(cells) + f" | {scaling} |")
    return lines


def _roofline_table(rows: list[dict[str, Any]], peaks: dict[str, Any]) -> list[str]:
    measured, derived = peaks["measured"], peaks["derived"]
    lines = [
        f"Machine peaks at {measured['threads']} threads: matmul {measured['gflops']:.0f} GFLOP/s, "
        f"copy {measured['copy_gbps']:.1f} GB/s (measured: {measured['how']})."
    ]
    if not derived.get("available"):
        lines[-1] += f" No derived peak ({derived.get('why', 'unavailable')})."
    else:
        lines[-1] += (f" Derived: {derived['gflops']:.0f} GFLOP/s, cache loads {derived['cache_load_gbps']:.0f} GB/s "
                      f"({derived['how']}).")
    lines += [
        "",
        "| case | msda GFLOP/s fwd / fwd+bwd | % of matmul peak (fwd) | % of derived peak (fwd) "
        "| compulsory GB/s fwd (% of copy bandwidth) | gathered GB/s fwd (% of derived cache loads) "
        "| core cycles per sample fwd / bwd | cycles per 64-byte corner line fwd / bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rl = r.get("roofline")
        if rl is None:
            continue
        derived_pct = f"{100 * rl['fraction_of_derived_peak_forward']:.2f}%" if "fraction_of_derived_peak_forward" in rl else "-"
        cache_pct = (f" ({100 * rl['fraction_of_cache_load_bandwidth_forward']:.1f}%)"
                     if "fraction_of_cache_load_bandwidth_forward" in rl else "")
        cycles = (f"{rl['cycles_per_sample_forward']:.0f} / {rl['cycles_per_sample_backward']:.0f} "
                  f"| {rl['cycles_per_line_forward']:.1f} / {rl['cycles_per_line_backward']:.1f}"
                  if "cycles_per_sample_forward" in rl else "- | -")
        lines.append(
            f"| {r['case']} | {rl['gflops_forward']:.1f} / {rl['gflops_forward_backward']:.1f} "
            f"| {100 * rl['fraction_of_matmul_peak_forward']:.2f}% | {derived_pct} "
            f"| {rl['dram_gbps_forward']:.2f} ({100 * rl['fraction_of_copy_bandwidth_forward']:.1f}%) "
            f"| {rl['gathered_gbps_forward']:.1f}{cache_pct} | {cycles} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    machine, settings = report["machine"], report["settings"]
    op_rows = [r for r in report["rows"] if r["kind"] == "op"]
    module_rows = [r for r in report["rows"] if r["kind"] == "module"]
    quick = settings["quick"]
    lines = [
        "# msda benchmarks" + (" (--quick smoke run)" if quick else ""),
        "",
    ]
    if quick:
        lines += [
            "**A smoke run: tiny shapes, few repeats. These numbers are not measurements; they show that every "
            "case runs. No targets are checked and no machine limits derived. Run without --quick to measure.**",
            "",
        ]
    lines += [
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"msda {machine['msda_version']} ({machine['msda_build']}); GPU: {machine['gpu'] or 'none'}.",
        f"Command: `{settings['command']}`. Started {report['started_utc']}, took {report['elapsed_s']:.0f} s; "
        f"load average (1, 5, 15 min) {_load(machine['load_average_at_start'])} at the start, "
        f"{_load(report['load_average_at_end'])} at the end (including this run's own); "
        + _other_work(report.get("other_work_cores")) + "; "
        f"OMP_WAIT_POLICY={settings.get('omp_wait_policy') or 'unset'}.",
        f"Times are medians after warm-up: msda {settings['repeats']} runs ({settings['warmup']} warm-up), "
        f"reference {settings['reference_repeats']} runs ({settings['reference_warmup']} warm-up) for op cases and "
        f"{settings['module_reference_repeats']} for the module cases (a reference call takes seconds), "
        f"the first forward+backward (the memory measurement) counting as one warm-up, at {settings['threads']} threads; "
        f"forward under torch.no_grad. "
        + (f"Each case ran {settings['rounds']} rounds, msda's and the reference's worker processes alternating "
           "(msda first in odd rounds, the reference first in even ones): times and memory are medians over the "
           "rounds, speed-ups the median of the rounds' own ratios (lowest-highest in brackets). "
           if settings.get("rounds", 1) > 1 else "")
        + f"Peak extra memory: resident-set peak over one forward+backward minus the RSS "
        f"before it, each (case, implementation) in its own process. Memory ratio = msda / reference.",
        "",
        "## Op: msda.ms_deform_attn against msda.ms_deform_attn_reference",
        "",
        *_comparison_table(op_rows),
        "",
    ]
    if module_rows:
        lines += ["## Module: MSDeformAttn layer and 6-layer encoder (module's op routed to the reference)", "",
                  *_comparison_table(module_rows), ""]
    if report["targets"]:
        lines += ["## Targets (ratios from this run)", "", "| target | measured | verdict |", "|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['description']} | {t['value']:.1f}x | {'PASS' if t['pass'] else 'MISS'} |")
        lines.append("")
    if quick:
        return "\n".join(lines)
    lines += [
        "## Machine limit (msda CPU kernel)",
        "",
        "FLOPs: forward = 10 * N*Lq*M*L*P*D (bilinear: 4 multiply-adds, attention weight: 1 multiply-add, per sample "
        "and channel); forward+backward = 3x forward. Compulsory DRAM bytes: value (at most the rows the samples can "
        "touch), locations, weights and output read/written once (backward: also the dense grad_value, grad_output "
        "and the small gradients). Gathered bytes: 4 corners "
        "x D x 4 bytes per sample, served from cache. Repeated calls find inputs up to the L3 size (32 MiB here) "
        "still in cache, so a small case can exceed the DRAM copy bandwidth.",
        "",
        "What bounds the kernel is neither: it is the number of distinct cache lines a sample touches. At D 32 a "
        "sample reads its 4 corner rows of value, 8 lines of 64 bytes (the backward also updates the same 8 lines "
        "of grad_value), and they seldom coincide with the previous samples' lines, so they come from L2 or L3. "
        "The last column is the cost per such line in core cycles (backward: per line of value or grad_value); "
        "for comparison, a loop that updates L1-resident rows with the same instructions takes about 2 cycles per "
        "line on this machine (benchmarks/line_cost.cpp, see benchmarks/README.md).",
        "",
        *_roofline_table(op_rows, report["peaks"]),
        "",
    ]
    return "\n".join(lines)
