"""A one-minute health check of an installed msda: the compiled kernels
against the pure-PyTorch reference on a few random problems, in every dtype,
printing the largest error against a float64 computation and the speedup.

    python benchmarks/quick_check.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import msda  # noqa: E402
from msda import _extension  # noqa: E402
from cases import float64_truth, make_case, run_op  # noqa: E402


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not _extension.AVAILABLE:
        print(f"msda's compiled extension is not available: {_extension.UNAVAILABLE_REASON}")
        return 1
    print(f"msda {msda.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    # Gradient errors are relative to the largest gradient entry (they grow with the map size).
    print(f"{'problem':<34} {'dtype':<9} {'max |err| out':>13} {'max rel. err grads':>18}")
    worst = 0.0
    problems = [
        dict(N=2, Lq=40, M=8, D=32, shapes=[(12, 17), (6, 9), (3, 5)], P=4),
        dict(N=1, Lq=17, M=3, D=71, shapes=[(7, 5), (1, 1)], P=3),
        dict(N=3, Lq=9, M=1, D=256, shapes=[(9, 13)], P=8),
    ]
    for i, problem in enumerate(problems):
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            case = make_case(**problem, seed=args.seed + i, value_dtype=dtype)
            out, grads = run_op(msda.ms_deform_attn, case)
            want_out, want_grads = float64_truth(case)
            err_out = (out.double() - want_out).abs().max().item()
            err_grad = max((g.double() - w).abs().max().item() / max(w.abs().max().item(), 1e-12)
                           for g, w in zip(grads, want_grads))
            if dtype in (torch.float64, torch.float32):
                worst = max(worst, err_out)
            name = f"N{problem['N']} Lq{problem['Lq']} M{problem['M']} D{problem['D']} L{len(problem['shapes'])} P{problem['P']}"
            print(f"{name:<34} {str(dtype).split('.')[1]:<9} {err_out:>13.2e} {err_grad:>18.2e}")

    print("\nspeed, float32, decoder-like problem (N 2, Lq 300, M 8, D 32, 4 levels up to 50x84, P 4):")
    case = make_case(N=2, Lq=300, M=8, D=32, shapes=[(50, 84), (25, 42), (13, 21), (7, 11)], P=4,
                     seed=1, value_dtype=torch.float32)
    for label, op in (("forward", None), ("forward+backward", "bwd")):
        times = {}
        for name, fn in (("msda", msda.ms_deform_attn), ("reference", msda.ms_deform_attn_reference)):
            if op is None:
                times[name] = _best_time(lambda: fn(*case.inputs))
            else:
                times[name] = _best_time(lambda: run_op(fn, case))
        print(f"  {label:<17} msda {times['msda'] * 1e3:8.2f} ms   reference {times['reference'] * 1e3:8.2f} ms"
              f"   speedup {times['reference'] / times['msda']:6.1f}x")
    ok = worst < 1e-4
    print(f"\nlargest float32/float64 output error: {worst:.2e} -> {'OK' if ok else 'TOO LARGE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
