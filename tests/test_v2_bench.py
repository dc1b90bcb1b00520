"""Smoke run of benchmarks/v2_bench.py (one timed call per case): it runs,
writes JSON with every case, and a markdown table. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_v2_bench_smoke(tmp_path):
    out = str(tmp_path / "v2")
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "v2_bench.py"), "--repeats", "1", "--warmup", "0",
                    "--out", out], check=True, capture_output=True, text=True, timeout=600)
    report = json.load(open(out + ".json"))
    cases = {(str(r["points"]), r["method"], r["pass"]) for r in report["rows"]}
    assert len(cases) == 8 and all(r["speedup"] > 0 for r in report["rows"])
    assert report["machine"]["cores"] >= 1
    # Whether the machine was idle is part of the measurement: load at start and end, and the date.
    assert len(report["machine"]["load_average_at_start"]) == 3 and len(report["load_average_at_end"]) == 3
    assert report["date_utc"].endswith("Z")
    assert "| points | method |" in open(out + ".md").read()
