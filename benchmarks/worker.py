"""Measures one (case, implementation) in a fresh process and prints one JSON line.

A fresh process per pair, because the resident-set peak of a process only
grows: memory is measured first, on the very first full-size forward+backward
(after a tiny call that starts thread pools and lazy library state), then the
same process times forward (under ``torch.no_grad``, as inference runs it) and
forward+backward at each requested thread count.

    python benchmarks/worker.py --case encoder_n1 --impl msda [--quick] [--repeats 5] ...

Run by run_all.py; usable alone for a single measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import msda  # noqa: E402
from cases import OP_CASES, QUICK_OP_CASES, make_op_inputs  # noqa: E402
from memory import peak_extra_bytes  # noqa: E402
from module_bench import (  # noqa: E402
    MODULE_CASES,
    QUICK_MODULE_CASES,
    build_module,
    make_module_inputs,
    use_reference_op,
)
from timing import forward_and_backward, time_calls  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
OP_ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def op_closures(name: str, impl: str, device: torch.device, quick: bool, dtype: torch.dtype = torch.float32):
    """(forward, forward+backward, tiny warm-up, dims) for an op-level case."""
    case = (QUICK_OP_CASES if quick else OP_CASES)[name]
    fn = msda.ms_deform_attn if impl == "msda" else msda.ms_deform_attn_reference
    tiny = make_op_inputs(QUICK_OP_CASES["decoder"], device, dtype)

    def tiny_call() -> None:
        for key in ("value", "sampling_locations", "attention_weights"):
            tiny[key].requires_grad_(True)
        fn(*(tiny[k] for k in OP_ARGS)).backward(tiny["grad_output"])

    inputs = make_op_inputs(case, device, dtype)
    leaves = [inputs[k].requires_grad_(True) for k in ("value", "sampling_locations", "attention_weights")]
    args = [inputs[k] for k in OP_ARGS]

    def forward() -> torch.Tensor:
        return fn(*args)

    return forward, forward_and_backward(forward, inputs["grad_output"], leaves), tiny_call, case.dims()


def module_closures(name: str, impl: str, device: torch.device, quick: bool):
    """(forward, forward+backward, tiny warm-up, dims) for a module-level case."""
    case = (QUICK_MODULE_CASES if quick else MODULE_CASES)[name]
    if impl == "reference":
        use_reference_op()
    model = build_module(case).to(device)
    tiny_case = QUICK_MODULE_CASES[name]
    tiny_model = build_module(tiny_case).to(device)
    tiny = make_module_inputs(tiny_case, device)
    keys = ("src", "pos", "reference_points", "spatial_shapes", "level_start_index")

    def tiny_call() -> None:
        tiny_model(*(tiny[k] for k in keys)).backward(tiny["grad_output"])

    inputs = make_module_inputs(case, device)
    args = [inputs[k] for k in keys]
    leaves = [inputs["src"], *model.parameters()]

    def forward() -> torch.Tensor:
        return model(*args)

    S = sum(h * w for h, w in case.levels)
    dims = {"N": case.N, "S": S, "Lq": S, "M": case.M, "D": case.d_model // case.M, "L": len(case.levels),
            "P": case.P, "layers": max(case.layers, 1)}
    return forward, forward_and_backward(forward, inputs["grad_output"], leaves), tiny_call, dims


def measure(forward: Callable[[], torch.Tensor], step: Callable[[], None], tiny_call: Callable[[], None],
            device: torch.device, threads: list[int], warmup: int, repeats: int) -> dict[str, object]:
    torch.set_num_threads(threads[0])
    tiny_call()
    # The memory call is also the first (warm-up) forward+backward.
    result: dict[str, object] = {"memory": peak_extra_bytes(step, device), "timings": {}}
    for t in threads:
        torch.set_num_threads(t)

        def inference() -> None:
            with torch.no_grad():
                forward()

        # At the first thread count the memory call already warmed up both paths once.
        warm = max(warmup - 1, 0) if t == threads[0] else warmup
        result["timings"][str(t)] = {
            "forward": time_calls(inference, device, warm, repeats),
            "forward_backward": time_calls(step, device, warm, repeats),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True)
    parser.add_argument("--impl", choices=["msda", "reference"], required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="first one is used for memory")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="value, locations, weights and grad_output (op cases only)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    is_module = args.case in MODULE_CASES
    if is_module:
        if args.dtype != "float32":
            parser.error("--dtype applies to op cases only")
        forward, step, tiny_call, dims = module_closures(args.case, args.impl, device, args.quick)
    else:
        forward, step, tiny_call, dims = op_closures(args.case, args.impl, device, args.quick, DTYPES[args.dtype])
    result = measure(forward, step, tiny_call, device, args.threads, args.warmup, args.repeats)
    result.update({"case": args.case, "impl": args.impl, "device": args.device, "kind": "module" if is_module else "op",
                   "dims": dims, "dtype": args.dtype})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
