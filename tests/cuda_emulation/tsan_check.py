"""Race detection in the CUDA emulation: run the kernels under ThreadSanitizer.

Builds the emulation harness with -fsanitize=thread and its race annotations
(race_detection.h), then runs, in a Python process started with libtsan
preloaded, each case below and counts the data races TSan reports during it:
the deliberately racy selftest kernels must be reported, their correct
versions and msda's real kernels (forward, both backward kernels, the
deterministic backward, vector and scalar paths, two blocks per launch; the
v2 op's discrete kernels and v1's kernels on its per-point level tables)
must not. Prints a table; exit status 0 when every case meets its expectation.

    python tests/cuda_emulation/tsan_check.py [--only NAME ...]

$MSDA_EMULATION_CSRC points it at another copy of csrc (as for inject_bugs.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
MARK = "@@msda-tsan-case "

# name -> whether TSan must report a race in it.
CASES = {
    "selftest racy_add": True,
    "selftest shared_read_before_barrier": True,
    "selftest shared_write_after_barrier": True,
    "selftest atomic_add": False,
    "selftest shared_with_barriers": False,
    "forward float32 D4": False,
    "backward warp kernel float32 D4": False,
    "backward warp kernel float16 D16": False,
    "backward block kernel float32 D33 (two shared-memory rounds)": False,
    "backward block kernel float16 D264": False,
    "backward deterministic float32 D8": False,
    # The v2 op: the discrete kernels, and v1's on per-point level tables.
    "v2 discrete forward float32 D8": False,
    "v2 discrete backward float32 D8": False,
    "v2 discrete backward float32 D3 (scalar)": False,
    "v2 default backward float32 D4 (per-point levels)": False,
    "v2 default backward deterministic float32 D8 (per-point levels)": False,
}


def run_case(emu, emu_v2, name: str) -> None:
    import torch

    from cases import make_case
    from cases_v2 import make_case_v2

    if name.startswith("selftest "):
        threads, blocks = 64, 2
        emu.selftest(name.split()[1], torch.ones(threads), torch.zeros(threads * blocks), threads, blocks)
        return
    D = int(name.split(" D")[1].split()[0])
    dtype = torch.float16 if "float16" in name else torch.float32
    P = 9 if "two shared-memory rounds" in name else 3
    # Many queries on a few pixels: threads of a block, and of the two
    # blocks, add to the same rows of grad_value.
    if name.startswith("v2 "):
        method = name.split()[1]
        case = make_case_v2(1, 24, 1, D, [(2, 2), (1, 2)], [3, 2], method, seed=D, value_dtype=dtype)
        op, args = emu_v2, case.args
    else:
        case = make_case(N=1, Lq=24, M=1, D=D, shapes=[(2, 2), (1, 2)], P=P, seed=D, value_dtype=dtype)
        op, args = emu, case.inputs
    op.set_grid_cap(2)  # two blocks, each several rounds of the grid-stride loops
    deterministic = "deterministic" in name
    torch.use_deterministic_algorithms(deterministic)
    try:
        if " forward " in f" {name} ":
            op.forward(*args)
        else:
            op.backward(*args, case.grad_output)
    finally:
        torch.use_deterministic_algorithms(False)


def child(names: list[str]) -> None:
    # The preload has done its work; the compiler that builds the module must not run under TSan.
    os.environ.pop("LD_PRELOAD", None)
    sys.path[:0] = [HERE, TESTS]
    import torch

    torch.set_num_threads(1)  # OpenMP threads are not what is checked here
    from build import load_emulation

    emu = load_emulation(tsan=True) if any(not n.startswith("v2 ") for n in names) else None
    emu_v2 = load_emulation(entry="emulated_ops_v2.cpp", tsan=True) if any(n.startswith("v2 ") for n in names) else None
    for name in names:
        os.write(2, f"\n{MARK}{name}\n".encode())
        run_case(emu, emu_v2, name)
    os.write(2, f"\n{MARK}end\n".encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains one of these words")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    names = [n for n in CASES if not args.only or any(w in n for w in args.only)]
    libtsan = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isfile(libtsan):
        print(f"tsan_check: libtsan not found (gcc -print-file-name=libtsan.so gave {libtsan!r})", file=sys.stderr)
        return 2
    env = dict(os.environ, LD_PRELOAD=libtsan, OMP_NUM_THREADS="1",
               TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 exitcode=0 history_size=4")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *names], env=env,
                          capture_output=True, text=True, timeout=3600)
    races: dict[str, int] = {}
    current = None
    for line in proc.stderr.splitlines():
        if line.startswith(MARK):
            current = line[len(MARK):]
            races.setdefault(current, 0)
        elif "WARNING: ThreadSanitizer:" in line and current is not None:
            races[current] = races.get(current, 0) + 1
    if proc.returncode != 0 or "end" not in races:
        print(proc.stderr[-6000:], file=sys.stderr)
        print(f"tsan_check: the TSan run failed (exit {proc.returncode})", file=sys.stderr)
        return 2
    failures = 0
    print(f"{'case':64} {'expected':>9} {'reports':>8}  result")
    for name in names:
        expected, got = CASES[name], races.get(name, 0)
        ok = (got > 0) == expected
        failures += not ok
        print(f"{name:64} {'race' if expected else 'clean':>9} {got:8d}  {'ok' if ok else 'FAIL'}")
    if failures:
        first = proc.stderr.find("WARNING: ThreadSanitizer:")
        print(proc.stderr[first:first + 4000] if first >= 0 else "", file=sys.stderr)
    print(f"tsan_check: {len(names) - failures} of {len(names)} cases as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
