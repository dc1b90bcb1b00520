"""16-bit on the CPU: the kernels take bfloat16/float16 inputs as given and
write 16-bit outputs and gradients, with no full-size float32 copy on the way
(no timing here: benchmarks/dtype_bench.py measures; this checks the paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import msda
from cases import make_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
pytestmark = pytest.mark.skipif(not msda._extension.AVAILABLE, reason="needs the compiled CPU kernels")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # The scripts must measure the msda these tests import (installed or in place).
    env = dict(os.environ)
    msda_parent = os.path.dirname(os.path.dirname(os.path.abspath(msda.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (msda_parent, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_autocast_reaches_the_16bit_kernel_without_casts():
    # MSDeformAttn under CPU bfloat16 autocast: value and weights arrive in
    # bfloat16, locations in float32, and no _to_copy runs inside the op.
    proc = _run("autocast_profile.py", "--quick", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "16-bit kernel without extra casts: yes" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq", [40, 6], ids=["per-head copies", "in place"])
def test_16bit_backward_allocates_nothing_full_size_in_float32(dtype, Lq):
    # Every tensor the backward allocates is at most grad_value's 16-bit size:
    # a float32 grad_value (or grad_output, or locations) would be twice that.
    case = make_case(N=1, Lq=Lq, M=2, D=64, shapes=[(5, 6), (2, 3)], P=3, seed=0, value_dtype=dtype)
    value = case.value.clone().requires_grad_(True)
    loc = case.sampling_locations.clone().requires_grad_(True)
    attn = case.attention_weights.clone().requires_grad_(True)
    out = msda.ms_deform_attn(value, case.spatial_shapes, case.level_start_index, loc, attn)
    grad_out = case.grad_output
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out.backward(grad_out)
    events = prof.events()
    spans = [e.time_range for e in events if e.name == "msda::ms_deform_attn_backward"]
    assert spans, "the backward op did not run"
    inside = [e for e in events if any(s.start <= e.time_range.start and e.time_range.end <= s.end for s in spans)]
    largest = max((e.self_cpu_memory_usage for e in inside), default=0)  # each allocation on its own
    assert 0 < largest <= value.numel() * value.element_size()
    assert value.grad.dtype == dtype and loc.grad.dtype == dtype and attn.grad.dtype == dtype


def test_dtype_bench_quick_run_writes_results(tmp_path):
    out = tmp_path / "dtype_bench.json"
    proc = _run("dtype_bench.py", "--quick", "--rounds", "3", "--calls", "1", "--cases", "encoder_n1",
                "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["load_average_at_start"] and report["load_average_at_end"]
    row = report["timings"]["encoder_n1"]
    assert set(row) == {"float32", "bfloat16", "float16"}
    # Each speedup is the median of the rounds' own float32 / dtype ratios, not a ratio of medians.
    for dtype in ("bfloat16", "float16"):
        for kind in ("forward", "forward_backward"):
            f32, mine = row["float32"][kind]["round_medians_s"], row[dtype][kind]["round_medians_s"]
            ratios = sorted(a / b for a, b in zip(f32, mine))
            assert len(ratios) == 3
            assert row[dtype]["round_speedups_vs_float32"][kind] == pytest.approx([a / b for a, b in zip(f32, mine)])
            assert row[dtype]["speedup_vs_float32"][kind] == pytest.approx(ratios[1])
    assert "rounds' own float32 / dtype ratios" in report["timing_method"]
    bad = _run("dtype_bench.py", "--rounds", "0")
    assert bad.returncode == 2 and "--rounds and --calls must be at least 1, got 0 and 5" in bad.stderr
    impls = {(m["impl"], m["dtype"]) for m in report["memory"]}
    assert impls == {("reference", "float32"), ("msda", "float32"), ("msda", "bfloat16"), ("msda", "float16")}
    assert all("malloc_trim" in m["method"] for m in report["memory"])
