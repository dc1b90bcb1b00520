"""The benchmark suite runs end to end in --quick mode and writes its JSON, markdown and plot.

No timing assertions: this checks the suite's plumbing (a process per case,
memory and timing fields, targets, roofline, plot), not the machine, and that
a smoke run passes no verdicts. Every benchmark script also runs without
matplotlib (imported only to draw the chart).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")
RUN_ALL = os.path.join(BENCHMARKS, "run_all.py")
# The benchmark scripts a user runs (each has a command line).
SCRIPTS = ("run_all.py", "worker.py", "v2_bench.py", "hf_detr.py", "detr_inference.py", "onnx_detr.py",
           "omp_wait_policy.py", "quick_check.py", "dispatch_vs_native.py", "limit_model.py", "row_cost.py",
           "v2_floor.py")


def _env(*first: str) -> dict:
    """os.environ with PYTHONPATH led by `first` and then the msda these tests import.

    The suite must benchmark the very msda these tests import (the installed
    package in CI, an in-place build in development), not a bare source tree.
    """
    import msda

    env = dict(os.environ)
    msda_parent = os.path.dirname(os.path.dirname(os.path.abspath(msda.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*first, msda_parent, env.get("PYTHONPATH", "")) if p)
    return env


def _without_matplotlib(tmp_path) -> dict:
    """An environment whose `import matplotlib` fails, in this process's children and theirs."""
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("matplotlib blocked by the test")\n')
    return _env(str(tmp_path / "blocked"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_without_matplotlib(tmp_path, script):
    assert os.path.exists(os.path.join(BENCHMARKS, script)), script
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--help"], capture_output=True,
                          text=True, env=_without_matplotlib(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_quick_run_without_matplotlib(tmp_path):
    # Measurements and tables do not need matplotlib: only the chart is skipped, and the run says so.
    out = tmp_path / "out"
    cmd = [sys.executable, RUN_ALL, "--quick", "--no-cuda", "--out", str(out), "--only", "decoder"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_without_matplotlib(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "benchmark.json").stat().st_size > 0
    assert "| decoder |" in (out / "benchmark.md").read_text()
    assert not (out / "speedup.png").exists()
    assert "matplotlib is not installed" in proc.stdout


def test_quick_run_writes_results(tmp_path):
    pytest.importorskip("matplotlib")
    env = _env()
    cmd = [sys.executable, RUN_ALL, "--quick", "--no-cuda", "--out", str(tmp_path),
           "--only", "encoder_n1", "decoder", "module_layer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    for name in ("benchmark.json", "benchmark.md", "speedup.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((tmp_path / "benchmark.json").read_text())
    for key in ("machine", "settings", "peaks", "flop_formula", "rows", "targets", "raw", "elapsed_s"):
        assert key in report, key
    for key in ("cpu_model", "cores", "torch", "msda_build_info"):
        assert key in report["machine"], key
    assert report["peaks"]["measured"]["gflops"] > 0
    assert report["peaks"]["measured"]["copy_gbps"] > 0
    assert report["settings"]["quick"] is True

    rows = {row["case"]: row for row in report["rows"] if row["device"] == "cpu"}
    assert set(rows) == {"encoder_n1", "decoder", "module_layer"}
    for row in rows.values():
        for impl in ("msda", "reference"):
            assert row[impl]["forward_s"] > 0
            assert row[impl]["forward_backward_s"] > 0
            assert row[impl]["peak_extra_bytes"] >= 0
        for key in ("speedup_forward", "speedup_forward_backward", "memory_reduction"):
            assert row[key] > 0, key
        assert set(row["scaling"]["msda"]) == {"forward", "forward_backward"}
    assert rows["encoder_n1"]["msda"]["gflops_forward"] > 0
    assert rows["encoder_n1"]["roofline"]["gflops_forward"] > 0

    # A smoke run gives no verdicts and says its numbers are not measurements; the
    # verdicts themselves are computed from the rows as a full run would.
    assert report["targets"] == []
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    from report import check_targets

    verdicts = {(t["case"], t["metric"]) for t in check_targets(report["rows"])}
    assert ("encoder_n1", "memory_reduction") in verdicts
    assert ("decoder", "speedup_forward_backward") in verdicts

    text = (tmp_path / "benchmark.md").read_text()
    assert "| encoder_n1 |" in text
    assert "## Targets" not in text and "| PASS |" not in text and "| MISS |" not in text and "1/0.0" not in text
    assert "not measurements" in text and "not measurements" in proc.stdout
    assert report["peaks"]["derived"] == {"available": False, "why": "--quick"}
    assert "Derived" not in text


@pytest.mark.skipif(sys.platform != "linux" or "avx512f" not in open("/proc/cpuinfo").read(),
                    reason="limit_model.py compiles an AVX-512 loop with -march=native")
def test_limit_model_quick_run(tmp_path):
    # Plumbing only: the sample file, line_cost.cpp's JSON, the model rows and both outputs.
    out = str(tmp_path / "limit")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "limit_model.py"), "--quick", "--repeats", "1",
                           "--out", out], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(open(out + ".json").read())
    assert report["quick"] is True and report["case"]["samples"] > 0
    assert set(report["floor_raw"]["orders"]) == {"query-major", "query-major, strips", "head-major",
                                                  "head-major, dense head copies"}
    for row in report["model"].values():
        assert row["cycles_per_sample"]["forward"] > 0 and row["speedup_over_reference"]["forward"] > 0
    assert len(report["load_average_at_end"]) == 3 and report["clock_hz"] > 0
    tasks = report["floor_raw"]["backward_head_tasks_s_per_sample"]  # msda's backward as its tasks run it
    assert tasks["items"] > 0 and tasks["copies"] > 0
    floor = report["model"]["floor, msda's orders (forward in strips, backward on dense head copies)"]
    per = report["clock_hz"]
    assert floor["cycles_per_sample"]["backward"] == pytest.approx((tasks["items"] + tasks["copies"]) * per)
    text = open(out + ".md").read()
    assert "not measurements" in text and "| msda, 1 thread |" in text and "its rows copied in" in text


@pytest.mark.skipif(shutil.which("g++") is None, reason="v2_floor.py compiles gather_floor.cpp with g++")
def test_v2_floor_run_takes_medians_of_rounds(tmp_path):
    # Two rounds: the times are the medians of the rounds' times, the ratios the medians of the rounds' ratios.
    out = str(tmp_path / "v2_floor")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "v2_floor.py"), "--rounds", "2", "--out", out],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(open(out + ".json").read())
    assert report["rounds"] == 2 and [row["points"] for row in report["rows"]] == [[4, 4, 4], [3, 6, 3]]
    for row in report["rows"]:
        t = row["round_s"]
        assert set(t) == {"floor cold", "floor warm", "msda cold", "msda warm", "reference"}
        assert all(len(v) == 2 and min(v) > 0 for v in t.values())
        assert row["median_s"]["msda cold"] == pytest.approx(sum(t["msda cold"]) / 2)
        assert row["msda_over_floor"]["cold"] == pytest.approx(
            sum(a / b for a, b in zip(t["msda cold"], t["floor cold"])) / 2)
        assert row["speedup_over_reference"]["floor cold"] == pytest.approx(
            sum(a / b for a, b in zip(t["reference"], t["floor cold"])) / 2)
        assert row["samples"] == 2 * 300 * 8 * 12
    text = open(out + ".md").read()
    assert "2 rounds, each calling the floor, msda and the reference in turn" in text
    bad = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "v2_floor.py"), "--rounds", "0"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and "--rounds must be at least 1, got 0" in bad.stderr


def test_row_cost_quick_run(tmp_path):
    # Plumbing only: every configuration timed, the derived figures and the summary in both outputs.
    out = str(tmp_path / "row_cost")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "row_cost.py"), "--quick", "--rounds", "1",
                           "--calls", "1", "--out", out], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(open(out + ".json").read())
    assert report["quick"] is True and len(report["load_average_at_end"]) == 3
    keys = set(report["timings"])
    for D in (16, 32, 64):
        assert {f"D{D} float32", f"D{D} bfloat16", f"D{D} float16"} <= keys
    assert {"D32 float32, rows in L1", "D32 bfloat16, rows in L1", "D32 float16, rows in L1"} <= keys
    for t in report["timings"].values():
        assert t["ns_per_sample"] > 0 and t["row_bytes"] == t["D"] * (4 if t["dtype"] == "float32" else 2)
    derived = report["derived"]
    assert set(derived["bound_if_fetching_halved_d32"]) == {"bfloat16", "float16"}
    text = open(out + ".md").read()
    assert "Reading it (D 32)" in text and all(line in text for line in report["summary"])


def _in_benchmarks(module: str, expression: str, argument):
    """`expression` evaluated with benchmarks/`module` imported and `argument` (JSON-able) bound, in a child
    process: benchmarks/ has its own `cases` module, which the tests' `cases` shadows in this one."""
    code = (f"import json, sys; sys.path.insert(0, sys.argv[1]); import {module}; "
            f"argument = json.loads(sys.argv[2]); print(json.dumps({expression}))")
    proc = subprocess.run([sys.executable, "-c", code, BENCHMARKS, json.dumps(argument)], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row_cost_summary(float32_ns: float, bfloat16_ns: float) -> list[str]:
    """row_cost.summary on made-up figures: float32 7 + 11 ns per sample, float16 at 1.2x."""
    timings = {}
    for name, total, shared in (("float32", float32_ns, 7.0), ("bfloat16", bfloat16_ns, 8.0),
                                ("float16", float32_ns / 1.2, 8.5)):
        for D in (16, 32, 64):
            scale = D / 32 if name == "float32" else 1.0
            timings[f"D{D} {name}"] = {"ns_per_sample": total * (0.5 + 0.5 * scale),
                                       "row_bytes": D * (4 if name == "float32" else 2)}
        timings[f"D32 {name}, rows in L1"] = {"ns_per_sample": shared, "row_bytes": 32 * (4 if name == "float32" else 2)}
    return _in_benchmarks("row_cost", "row_cost.summary(row_cost.derive(argument))", timings)


def test_row_cost_summary_says_which_dtypes_beat_the_halved_bytes_bound():
    # bfloat16 at 18 / 9 = 2x beats the bound (18 / (8 + 5.5) = 1.33x); float16 at 1.2x does not.
    beaten = _row_cost_summary(18.0, 9.0)[-1]
    assert "Measured beats that for bfloat16: its rows" in beaten
    # Neither beats it: the summary says that only a smaller shared part can help.
    plain = _row_cost_summary(18.0, 16.0)[-1]
    assert "Measured beats" not in plain and "only a smaller shared part helps" in plain


def _limit_model_reading(msda: tuple, floor: tuple, goal: tuple, head_tasks: dict | None = None) -> list[str]:
    """limit_model.reading on made-up (forward, backward) cycles per sample (and the backward floor's parts)."""
    def row(cycles, speedups=(40.0, 30.0)):
        return {"cycles_per_sample": dict(zip(("forward", "backward"), cycles)),
                "speedup_over_reference": {"forward": speedups[0], "forward+backward": speedups[1]}}
    model = {"msda, 2 threads": row(msda), "msda, 1 thread": row(msda),
             "goal: 50x forward, 40x forward+backward": row(goal, (50.0, 40.0)),
             "floor, encoder rows, query-major (value as laid out)": row(floor),
             "floor, msda's orders (forward in strips, backward on dense head copies)": row(floor, (67.0, 58.0))}
    return _in_benchmarks("limit_model", "limit_model.reading(argument[0], 2, argument[1])", (model, head_tasks))


def test_limit_model_reading_follows_its_figures():
    # msda above the floor in both passes, goals above the floors: the floor bounds the speedups.
    text = "\n".join(_limit_model_reading(msda=(46.0, 110.0), floor=(24.0, 89.0), goal=(32.0, 133.0)))
    assert "upper bounds for this design" in text and "not a lower bound" not in text
    assert "its forward must drop from 46.0 to 32.0" in text and "backward is already under the goal" in text
    # msda's backward faster than the floor's loop, forward goal under the floor: said so, no negative budgets.
    text = "\n".join(_limit_model_reading(msda=(79.0, 152.0), floor=(63.0, 169.0), goal=(46.0, 99.0)))
    assert "here the floor is not a lower bound for the backward" in text
    assert "upper bounds for this design" not in text
    assert "The forward goal (46.0 cycles per sample) is under the floor of this data movement (63.0)" in text
    assert "17.0 fewer backward" in text and "may spend -" not in text
    assert "copies, about 2 passes over value per call, not included" in text  # no task timings: said so
    # The backward floor as msda's tasks run it: its parts are named, and msda's copies count in the floor.
    text = "\n".join(_limit_model_reading(msda=(64.0, 160.0), floor=(52.0, 152.5), goal=(46.0, 87.0),
                                          head_tasks={"items": 140.6, "copies": 11.9}))
    assert "the items 140.6, the copies 11.9" in text and "not included" not in text
    assert "7.5 more backward" in text and "the head copies" not in text
    assert "The backward goal (87.0 cycles per sample) is under the floor of this data movement (152.5)" in text


def test_quick_run_rounds_alternate_and_take_the_median_ratio(tmp_path):
    # --rounds 2: msda then the reference, then the reference then msda; the speed-up is the median of
    # the two rounds' ratios, and the table gives their range.
    cmd = [sys.executable, RUN_ALL, "--quick", "--no-cuda", "--out", str(tmp_path), "--only", "decoder",
           "--rounds", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert [(r["round"], r["impl"]) for r in report["raw"]] == [(0, "msda"), (0, "reference"),
                                                                (1, "reference"), (1, "msda")]
    (row,) = report["rows"]
    for metric, which in (("speedup_forward", "forward"), ("speedup_forward_backward", "forward_backward")):
        ratios = [ref["timings"]["2"][which]["median_s"] / mine["timings"]["2"][which]["median_s"]
                  for mine, ref in ((report["raw"][0], report["raw"][1]), (report["raw"][3], report["raw"][2]))]
        assert row["round_speedups"][metric] == pytest.approx(ratios)
        assert row[metric] == pytest.approx(sum(ratios) / 2)
    text = (tmp_path / "benchmark.md").read_text()
    assert "Each case ran 2 rounds" in text
    assert f"{row['speedup_forward']:.1f}x ({min(row['round_speedups']['speedup_forward']):.1f}-" in text
    bad = subprocess.run([sys.executable, RUN_ALL, "--rounds", "0"], capture_output=True, text=True, env=_env(),
                         timeout=120)
    assert bad.returncode == 2 and "--rounds must be at least 1, got 0" in bad.stderr
