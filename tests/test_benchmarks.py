"""The benchmark suite runs end to end in --quick mode and writes its JSON, markdown and plot.

No timing assertions: this checks the suite's plumbing (a process per case,
memory and timing fields, targets, roofline, plot), not the machine, and that
a smoke run passes no verdicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ALL = os.path.join(REPO_ROOT, "benchmarks", "run_all.py")

pytest.importorskip("matplotlib")


def test_quick_run_writes_results(tmp_path):
    # The suite must benchmark the very msda these tests import (the installed
    # package in CI, an in-place build in development), not a bare source tree.
    import msda

    env = dict(os.environ)
    msda_parent = os.path.dirname(os.path.dirname(os.path.abspath(msda.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (msda_parent, env.get("PYTHONPATH", "")) if p)
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
