"""Where the time goes in one MSDeformAttn under CPU autocast (bfloat16), and
whether the attention op runs its 16-bit kernel without extra casts.

Runs forward+backward of one ``msda.MSDeformAttn`` (encoder shape, N 1) under
``torch.autocast("cpu", dtype=torch.bfloat16)`` in torch.profiler, prints the
operator table, the dtypes msda's two ops received, and how many cast ops
(aten::_to_copy, aten::copy_) ran inside them: 0 means the kernels
read their inputs as autocast handed them (value and weights bfloat16,
locations float32) and wrote outputs and gradients in those dtypes.

    python benchmarks/autocast_profile.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from module_bench import MODULE_CASES, QUICK_MODULE_CASES, build_module, make_module_inputs  # noqa: E402

KEYS = ("src", "pos", "reference_points", "spatial_shapes", "level_start_index")
MSDA_OPS = ("msda::ms_deform_attn_forward", "msda::ms_deform_attn_backward")
# aten::to itself is recorded also when it returns its input unchanged (same
# dtype, e.g. the level tables' int64 check); a real conversion shows as
# aten::_to_copy, which copies with aten::copy_.
CASTS = ("aten::_to_copy", "aten::copy_")


def ops_inside(events, op_name: str) -> list:
    """Events that ran within (nested in the time range of, same thread) any call of op_name."""
    spans = [(e.time_range.start, e.time_range.end, e.thread) for e in events if e.name == op_name]
    return [e for e in events if e.name != op_name and any(
        s <= e.time_range.start and e.time_range.end <= t and e.thread == th for s, t, th in spans)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small maps (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = (QUICK_MODULE_CASES if args.quick else MODULE_CASES)["module_layer"]
    model = build_module(case)
    x = make_module_inputs(case, torch.device("cpu"))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*(x[k] for k in KEYS))
        out.backward(x["grad_output"].to(out.dtype))

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.events()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    ok = True
    for name in MSDA_OPS:
        calls = [e for e in events if e.name == name]
        inside = ops_inside(events, name)
        casts = sum(1 for e in inside if e.name in CASTS)
        dtypes = calls[0].input_dtypes if calls else []
        print(f"{name}: {len(calls)} call(s); input dtypes {dtypes}; ops inside: "
              f"{sorted({e.name for e in inside})}; casts (_to_copy/copy_) inside: {casts}")
        ok &= bool(calls) and casts == 0 and "c10::BFloat16" in (dtypes[0] if dtypes else "")
    print("16-bit kernel without extra casts:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
