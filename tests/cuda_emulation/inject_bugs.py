"""Show that the CUDA emulation tests catch deliberate bugs in the CUDA kernels.

For each bug below: copy csrc/ to a temporary directory, apply the one edit,
rebuild the emulation harness against the copy, run the emulation tests
(TEST_FILES, stopping at the first failure), and record whether it failed. The unmodified
sources run first and must pass. Prints a table bug -> caught / MISSED.

    python tests/cuda_emulation/inject_bugs.py [--only NAME ...] [--list] [--tsan]

Exit status 0 when every bug is caught. Takes a few minutes (one harness
build, about 30 s, per bug).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
KERNELS = "cuda/ms_deform_attn_kernels.cuh"
# The test files that run the emulated CUDA kernels (with -x: the first failure ends a run).
# The quick and targeted ones first (pytest runs each test once, in this order).
TEST_FILES = ["test_window_edges.py", "test_large.py"] + [
    f"test_cuda_emulation.py::{name}" for name in (
        "test_each_kernel_variant", "test_capped_grid_runs_grid_stride_rounds", "test_each_input_misaligned",
        "test_16bit_grad_value_terms_are_summed_in_float32", "test_atomics_one_per_valid_corner_and_channel",
        "test_deterministic_backward_is_bitwise_reproducible_across_thread_orders")
] + ["test_cuda_emulation.py"]
LAUNCH = "cuda/ms_deform_attn_launch.h"


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    kind: str
    file: str  # relative to csrc/
    old: str
    new: str


BUGS = [
    Bug("row uses H as the row length", "index arithmetic", KERNELS,
        "c.row[k] = lv.start + (y0 + dy) * lv.W + (x0 + dx);",
        "c.row[k] = lv.start + (y0 + dy) * lv.H + (x0 + dx);"),
    Bug("value offset forgets the head stride", "index arithmetic", KERNELS,
        "h.value_offset = (h.n * S * M + h.m) * D;",
        "h.value_offset = (h.n * S + h.m) * D;"),
    Bug("channel group not scaled by VEC", "index arithmetic", KERNELS,
        "const int64_t c = (t - hq * groups) * VEC;",
        "const int64_t c = (t - hq * groups);"),
    Bug("warp reduction skips its first step", "reduction", KERNELS,
        "for (int offset = width / 2; offset > 0; offset /= 2)",
        "for (int offset = width / 4; offset > 0; offset /= 2)"),
    Bug("block reduction drops the last warp", "reduction", KERNELS,
        "for (int w = 0; w < warps; ++w) sum += partial[w][j][k];",
        "for (int w = 0; w + 1 < warps; ++w) sum += partial[w][j][k];"),
    Bug("grad_value misses the bilinear weight", "reduction", KERNELS,
        "const acc_t aw = a * cn.w[k];\n        acc_t* dst",
        "const acc_t aw = a;\n        acc_t* dst"),
    Bug("shuffle mask names the wrong lanes", "warp shuffle", KERNELS,
        "const unsigned mask = segment_bits << (lane & ~(width - 1));",
        "const unsigned mask = segment_bits;"),
    # (A grid that is merely too small is not a bug: the kernels loop over the rest.)
    Bug("forward grid rounds down to zero blocks", "launch configuration", LAUNCH,
        "grid_for(ceil_div(threads_needed, kThreadsPerBlock))",
        "grid_for(threads_needed / kThreadsPerBlock)"),
    Bug("warp kernel blocks not a whole number of warps", "launch configuration", LAUNCH,
        "MSDA_LAUNCH(kernel, grid, dim3(kThreadsPerBlock), 0, stream,",
        "MSDA_LAUNCH(kernel, grid, dim3(kThreadsPerBlock - 56), 0, stream,"),
    Bug("warp segment width not a power of two", "launch configuration", LAUNCH,
        "const int width = next_power_of_two(groups);",
        "const int width = static_cast<int>(groups);"),
    Bug("block kernel with a partial warp", "launch configuration", LAUNCH,
        "std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, kThreadsPerBlock)",
        "std::min<int64_t>(groups, kThreadsPerBlock)"),
    Bug("missing __syncthreads before the block sums", "missing barrier", KERNELS,
        "      __syncthreads();\n      for (int64_t i = threadIdx.x;",
        "      for (int64_t i = threadIdx.x;"),
    Bug("missing __syncthreads before shared memory is reused", "missing barrier", KERNELS,
        "      __syncthreads();  // the next round overwrites `partial`\n",
        ""),
    Bug("vectorised although the pointer is misaligned", "alignment", LAUNCH,
        "    if (!aligned_16(t->const_data_ptr())) return false;\n",
        ""),
    Bug("vectorised when D is not a multiple of the vector", "alignment", LAUNCH,
        "if (D % vector_width<scalar_t>() != 0) return false;",
        "if (D % 2 != 0) return false;"),
    Bug("invalid levels not skipped", "memory safety", KERNELS,
        "lv.valid = lv.H >= 1 && lv.W >= 1 && lv.start >= 0 && lv.start <= S &&",
        "lv.valid = lv.H >= 1 && lv.W >= 1 &&"),
    # The classes an independent set of injected bugs found missed (issue 12).
    Bug("sampling window admits x == W", "window edge", KERNELS,
        "if (!(x > acc_t(-1) && x < W && y > acc_t(-1) && y < H)) return false;",
        "if (!(x > acc_t(-1) && x <= W && y > acc_t(-1) && y < H)) return false;"),
    Bug("sampling window admits y == -1", "window edge", KERNELS,
        "if (!(x > acc_t(-1) && x < W && y > acc_t(-1) && y < H)) return false;",
        "if (!(x > acc_t(-1) && x < W && y >= acc_t(-1) && y < H)) return false;"),
    Bug("grad_value += instead of atomicAdd", "race", KERNELS,
        "for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, aw * go[i]);",
        "for (int i = 0; i < VEC; ++i) dst[i] += aw * go[i];"),
    Bug("forward grid-stride step doubled", "grid-stride loop", KERNELS,
        "       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const int64_t hq = div_floor(t, groups);",
        "       t += 2 * static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const int64_t hq = div_floor(t, groups);"),
    Bug("backward vectorised although grad_output is misaligned", "alignment", LAUNCH,
        "const bool vec = can_vectorize<scalar_t>(p.D, {&in.value, &go});",
        "const bool vec = can_vectorize<scalar_t>(p.D, {&in.value});"),
    Bug("block kernel with more warps than its shared array holds", "shared memory bounds", LAUNCH,
        "std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, kThreadsPerBlock)",
        "std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, 2 * kThreadsPerBlock)"),
    Bug("forward value offset truncated to int32", "64-bit indexing", KERNELS,
        "h.value_offset = (h.n * S * M + h.m) * D;",
        "h.value_offset = static_cast<int32_t>((h.n * S * M + h.m) * D);"),
    Bug("forward row offset truncated to int32", "64-bit indexing", KERNELS,
        "load_pack<scalar_t, VEC>(v + cn.row[k] * row_stride);\n#pragma unroll\n          for (int i = 0; i < VEC; ++i) acc[i]",
        "load_pack<scalar_t, VEC>(v + static_cast<int32_t>(cn.row[k] * row_stride));\n#pragma unroll\n"
        "          for (int i = 0; i < VEC; ++i) acc[i]"),
    Bug("grad_value terms rounded to the 16-bit dtype before the atomic", "precision", KERNELS,
        "atomicAdd(dst + i, aw * go[i]);",
        "atomicAdd(dst + i, static_cast<acc_t>(static_cast<scalar_t>(aw * go[i])));"),
    # What the deterministic memory checks are for.
    Bug("grad_value not zeroed", "unzeroed output", LAUNCH,
        ": at::zeros(in.value.sizes(), value.options().dtype(acc));",
        ": at::empty(in.value.sizes(), value.options().dtype(acc));"),
    # The deterministic backward.
    Bug("deterministic gather skips a row's last entry", "deterministic backward", KERNELS,
        "for (int64_t j = row_begin[row]; j < row_begin[row + 1]; ++j) {",
        "for (int64_t j = row_begin[row]; j + 1 < row_begin[row + 1]; ++j) {"),
    Bug("deterministic keys forget the head", "deterministic backward", KERNELS,
        "key[4 * t + k] = ok ? static_cast<int32_t>((n * S + cn.row[k]) * M + m) : none;",
        "key[4 * t + k] = ok ? static_cast<int32_t>((n * S + cn.row[k]) * M) : none;"),
    Bug("corner check admits the column past the last", "memory safety", KERNELS,
        "const bool x_ok[2] = {x0 >= 0, x0 + 1 < lv.W};",
        "const bool x_ok[2] = {x0 >= 0, x0 + 1 <= lv.W};"),
]


def apply(bug: Bug, csrc: str) -> None:
    path = os.path.join(csrc, bug.file)
    with open(path) as f:
        text = f.read()
    count = text.count(bug.old)
    if count != 1:
        raise SystemExit(f"bug {bug.name!r}: expected the text once in {bug.file}, found it {count} times "
                         "(the kernel sources changed: update inject_bugs.py)")
    with open(path, "w") as f:
        f.write(text.replace(bug.old, bug.new))


def run_tests(csrc: str, cache: str, timeout: float, tsan: bool = False) -> tuple[str, float, str]:
    """Return (outcome, seconds, last line): 'passed', 'failed', 'crashed', 'build error' or 'timeout'."""
    env = dict(os.environ, MSDA_EMULATION_CSRC=csrc, MSDA_CACHE_DIR=cache, CI=os.environ.get("CI", "true"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(REPO_ROOT, "src"), env.get("PYTHONPATH")) if p)
    if tsan:  # the race detection check instead of the tests
        cmd = [sys.executable, os.path.join(HERE, "tsan_check.py"), "--only", "backward", "forward"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        cmd += [os.path.join(REPO_ROOT, "tests", name) for name in TEST_FILES]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    seconds = time.time() - start
    out = proc.stdout + proc.stderr
    failed_lines = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR")) or "FAIL" in line]
    last = failed_lines[0] if failed_lines else (out.strip().splitlines() or [""])[-1]
    if proc.returncode == 0:
        return "passed", seconds, last
    if proc.returncode < 0:  # e.g. SIGSEGV from an out-of-bounds access
        return "crashed", seconds, f"killed by signal {-proc.returncode}"
    if "Error building extension" in out:
        return "build error", seconds, last
    return "failed", seconds, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only bugs whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that the unmodified sources pass (when they just did)")
    parser.add_argument("--tsan", action="store_true",
                        help="judge each bug by the race detection check (tsan_check.py) alone, not the tests")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or any(w in b.name for w in args.only)]
    if args.list:
        for b in bugs:
            print(f"{b.kind:22} {b.name}")
        return 0

    with tempfile.TemporaryDirectory(prefix="msda-inject-") as tmp:
        def fresh_csrc(tag: str) -> tuple[str, str]:
            root = os.path.join(tmp, tag)
            shutil.copytree(os.path.join(REPO_ROOT, "csrc"), os.path.join(root, "csrc"))
            return os.path.join(root, "csrc"), os.path.join(root, "cache")

        csrc, cache = fresh_csrc("baseline")
        outcome, seconds, last = ("passed", 0.0, "") if args.skip_baseline else run_tests(
            csrc, cache, args.timeout, args.tsan)
        print(f"baseline (no bug): {'skipped' if args.skip_baseline else outcome} in {seconds:.0f} s", flush=True)
        if outcome != "passed":
            print(f"  {last}\nthe unmodified kernels must pass first", file=sys.stderr)
            return 2
        shutil.rmtree(os.path.dirname(cache) + "/cache", ignore_errors=True)

        rows = []
        for i, bug in enumerate(bugs):
            csrc, cache = fresh_csrc(f"bug{i}")
            apply(bug, csrc)
            outcome, seconds, last = run_tests(csrc, cache, args.timeout, args.tsan)
            verdict = {"failed": "caught", "crashed": "caught (crash)", "passed": "MISSED"}.get(outcome, outcome)
            rows.append((bug, verdict, seconds, last))
            print(f"{verdict:12} {seconds:5.0f} s  {bug.kind:22} {bug.name}\n{'':20}{last[:150]}", flush=True)
            shutil.rmtree(os.path.join(tmp, f"bug{i}"), ignore_errors=True)

    print("\n| bug | kind | result |\n|---|---|---|")
    for bug, verdict, seconds, _ in rows:
        print(f"| {bug.name} | {bug.kind} | {verdict} ({seconds:.0f} s) |")
    missed = [r for r in rows if not r[1].startswith("caught")]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
