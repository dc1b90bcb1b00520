"""Show that the CUDA emulation tests catch deliberate bugs in the CUDA kernels.

For each bug below: copy csrc/ to a temporary directory, apply the one edit,
rebuild the emulation harness against the copy, run its check, and record
whether it failed. A bug's check is the emulation tests (TEST_FILES, or the
bug's own list of tests, stopping at the first failure), the race detection
check (tsan_check.py), or the tests against the UBSan + FMA-contracting build
(MSDA_EMULATION_BUILD=ubsan-fma). The unmodified sources run first and must
pass. Prints a table bug -> caught / MISSED.

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
V2_KERNELS = "cuda/v2_discrete_kernels.cuh"
V2_LAUNCH = "cuda/v2_launch.h"
DISCRETE_INDEX = "v2_discrete_index.h"
EDGE_TESTS = "test_cuda_emulation_edges.py::"


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    kind: str
    file: str  # relative to csrc/
    old: str
    new: str
    tests: tuple[str, ...] = ()  # the tests that should catch it (default: TEST_FILES)
    check: str = "tests"  # or "tsan" (tsan_check.py) or "ubsan-fma" (the tests on that build)


def swap(line: str, part: str, replacement: str) -> tuple[str, str]:
    """A bug's (old, new) text where it changes `part` of one source line:
    the line is written once, and the edit is what stands out."""
    if line.count(part) != 1:
        raise ValueError(f"{part!r} must occur once in {line!r}")
    return line, line.replace(part, replacement)


def v2_tests(*names: str) -> tuple[str, ...]:
    return tuple(f"test_v2_cuda_emulation.py::{name}" for name in names)


BUGS = [
    Bug("row uses H as the row length", "index arithmetic", KERNELS,
        *swap("c.row[k] = lv.start + (y0 + dy) * lv.W + (x0 + dx);", "lv.W", "lv.H")),
    Bug("value offset forgets the head stride", "index arithmetic", KERNELS,
        *swap("h.value_offset = (h.n * S * M + h.m) * D;", "S * M", "S")),
    Bug("channel group not scaled by VEC", "index arithmetic", KERNELS,
        *swap("const int64_t c = (t - hq * groups) * VEC;", " * VEC", "")),
    Bug("warp reduction skips its first step", "reduction", KERNELS,
        *swap("for (int offset = width / 2; offset > 0; offset /= 2)", "width / 2", "width / 4")),
    Bug("block reduction drops the last warp", "reduction", KERNELS,
        *swap("for (int w = 0; w < warps; ++w) sum += partial[w][j][k];", "w < warps", "w + 1 < warps")),
    Bug("grad_value misses the bilinear weight", "reduction", KERNELS,
        "const acc_t aw = a * cn.w[k];\n        acc_t* dst",
        "const acc_t aw = a;\n        acc_t* dst"),
    Bug("shuffle mask names the wrong lanes", "warp shuffle", KERNELS,
        "return segment_bits << (lane & ~(width - 1));",
        "return segment_bits;"),
    # (A grid that is merely too small is not a bug: the kernels loop over the rest.)
    Bug("forward grid rounds down to zero blocks", "launch configuration", LAUNCH,
        *swap("grid_for(ceil_div(threads_needed, kThreadsPerBlock))",
              "ceil_div(threads_needed, kThreadsPerBlock)", "threads_needed / kThreadsPerBlock")),
    Bug("warp kernel blocks not a whole number of warps", "launch configuration", LAUNCH,
        *swap("MSDA_LAUNCH(kernel, grid, dim3(kThreadsPerBlock), 0, stream,",
              "kThreadsPerBlock", "kThreadsPerBlock - 56")),
    Bug("warp segment width not a power of two", "launch configuration", LAUNCH,
        *swap("const int width = next_power_of_two(groups);", "next_power_of_two", "static_cast<int>")),
    Bug("block kernel with a partial warp", "launch configuration", LAUNCH,
        *swap("std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, kThreadsPerBlock)",
              "ceil_div(groups, kWarpSize) * kWarpSize", "groups")),
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
        *swap("if (D % vector_width<scalar_t>() != 0) return false;", "vector_width<scalar_t>()", "2")),
    Bug("invalid levels not skipped", "memory safety", KERNELS,
        *swap("lv.valid = lv.H >= 1 && lv.W >= 1 && lv.start >= 0 && lv.start <= S &&",
              " lv.start >= 0 && lv.start <= S &&", "")),
    # The classes an independent set of injected bugs found missed (issue 12).
    Bug("sampling window admits x == W", "window edge", KERNELS,
        *swap("if (!(x > acc_t(-1) && x < W && y > acc_t(-1) && y < H)) return false;", "x < W", "x <= W")),
    Bug("sampling window admits y == -1", "window edge", KERNELS,
        *swap("if (!(x > acc_t(-1) && x < W && y > acc_t(-1) && y < H)) return false;",
              "y > acc_t(-1)", "y >= acc_t(-1)")),
    Bug("grad_value += instead of atomicAdd", "race", KERNELS,
        *swap("for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, aw * go[i]);",
              "atomicAdd(dst + i, aw * go[i])", "dst[i] += aw * go[i]")),
    Bug("forward grid-stride step doubled", "grid-stride loop", KERNELS,
        "       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const int64_t hq = div_floor(t, groups);",
        "       t += 2 * static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const int64_t hq = div_floor(t, groups);"),
    Bug("backward vectorised although grad_output is misaligned", "alignment", LAUNCH,
        *swap("const bool vec = can_vectorize<scalar_t>(p.D, {&in.value, &go});", "{&in.value, &go}", "{&in.value}")),
    Bug("block kernel with more warps than its shared array holds", "shared memory bounds", LAUNCH,
        *swap("std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, kThreadsPerBlock)",
              "kThreadsPerBlock", "2 * kThreadsPerBlock")),
    Bug("forward value offset truncated to int32", "64-bit indexing", KERNELS,
        *swap("h.value_offset = (h.n * S * M + h.m) * D;",
              "(h.n * S * M + h.m) * D", "static_cast<int32_t>((h.n * S * M + h.m) * D)")),
    Bug("forward row offset truncated to int32", "64-bit indexing", KERNELS,
        *swap("add_scaled_pack<scalar_t, acc_t, VEC>(acc, a * cn.w[k], v + cn.row[k] * row_stride);",
              "cn.row[k] * row_stride", "static_cast<int32_t>(cn.row[k] * row_stride)")),
    Bug("grad_value terms rounded to the 16-bit dtype before the atomic", "precision", KERNELS,
        *swap("atomicAdd(dst + i, aw * go[i]);",
              "aw * go[i]", "static_cast<acc_t>(static_cast<scalar_t>(aw * go[i]))")),
    # What the deterministic memory checks are for.
    Bug("grad_value not zeroed", "unzeroed output", LAUNCH,
        *swap(": at::zeros(in.value.sizes(), value.options().dtype(acc));", "zeros", "empty")),
    # The deterministic backward.
    Bug("deterministic gather skips a row's last entry", "deterministic backward", KERNELS,
        *swap("for (int64_t j = row_begin[row]; j < row_begin[row + 1]; ++j) {", "j < row_begin", "j + 1 < row_begin")),
    Bug("deterministic keys forget the head", "deterministic backward", KERNELS,
        *swap("key[4 * t + k] = ok ? static_cast<int32_t>((n * S + cn.row[k]) * M + m) : none;", "* M + m", "* M")),
    Bug("corner check admits the column past the last", "memory safety", KERNELS,
        *swap("const bool x_ok[2] = {x0 >= 0, x0 + 1 < lv.W};", "x0 + 1 < lv.W", "x0 + 1 <= lv.W")),
    # The v2 discrete kernels, the deterministic backward and the shared helpers.
    Bug("discrete row uses H as the row length", "index arithmetic (v2)", V2_KERNELS,
        *swap("return (x < 0 || y < 0) ? -1 : lv.start + y * lv.W + x;", "lv.W", "lv.H"),
        tests=v2_tests("test_emulated_discrete_launch_shapes")),
    Bug("discrete invalid levels not skipped", "memory safety (v2)", V2_KERNELS,
        "  if (!lv.valid) return -1;\n", "",
        tests=v2_tests("test_wrong_level_tables_skip_the_level")),
    Bug("discrete grad_value += instead of atomicAdd", "race (v2)", V2_KERNELS,
        "atomicAdd(grad_value + offset + c + k, a * go[k]);",
        "grad_value[offset + c + k] += a * go[k];",
        tests=v2_tests("test_discrete_atomics_one_per_read_point_and_channel")),
    Bug("discrete grad_value += instead of atomicAdd (TSan)", "race (v2)", V2_KERNELS,
        "atomicAdd(grad_value + offset + c + k, a * go[k]);",
        "grad_value[offset + c + k] += a * go[k];", check="tsan"),
    Bug("discrete grad_attn unwritten where a point reads nothing", "unwritten output (v2)", V2_KERNELS,
        *swap("      if (first == 0) grad_attn[point] = dot;", "first == 0", "first == 0 && row >= 0"),
        tests=v2_tests("test_non_finite_and_far_in_either_coordinate")),
    Bug("discrete grad_value not zeroed", "unzeroed output (v2)", V2_LAUNCH,
        *swap("at::Tensor grad_value = at::zeros(v.sizes(), value.options().dtype(acc));", "zeros", "empty"),
        tests=v2_tests("test_emulated_discrete_launch_shapes")),
    Bug("discrete forward grid-stride step doubled", "grid-stride loop (v2)", V2_KERNELS,
        "       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const int64_t hq = div_floor(t, groups);",
        "       t += 2 * static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const int64_t hq = div_floor(t, groups);",
        tests=v2_tests("test_capped_grid_runs_grid_stride_rounds")),
    Bug("discrete backward vectorised although grad_output is misaligned", "alignment (v2)", V2_LAUNCH,
        *swap("if (cuda_launch::can_vectorize<scalar_t>(p.D, {&v, &go})) {", "{&v, &go}", "{&v}"),
        tests=v2_tests("test_each_input_misaligned")),
    Bug("discrete clamp admits index == size", "discrete boundary", DISCRETE_INDEX,
        *swap("if (!(static_cast<double>(v) < static_cast<double>(size))) return size - 1;",
              "< static_cast<double>(size)", "<= static_cast<double>(size)"),
        tests=v2_tests("test_discrete_exact_pixel_boundaries_and_the_clamp")),
    Bug("discrete product left to FMA contraction", "FMA contraction", DISCRETE_INDEX,
        "  volatile float product = a * b;  // the store forces the rounding\n  return product;",
        "  return a * b;", check="ubsan-fma",
        tests=v2_tests("test_the_contracting_build_contracts",
                       "test_discrete_index_rounds_the_product_before_adding_half")),
    Bug("warp mask shifts by the full warp width", "undefined behaviour", KERNELS,
        "const unsigned segment_bits = width == kWarpSize ? 0xffffffffu : ((1u << width) - 1u);",
        "const unsigned segment_bits = (1u << width) - 1u;", check="ubsan-fma",
        tests=("test_cuda_emulation.py::test_each_kernel_variant",)),
    Bug("16-bit forward terms rounded before the sum", "precision", KERNELS,
        *swap("for (int i = 0; i < VEC; ++i) acc[i] += a * static_cast<acc_t>(x.v[i]);",
              "a * static_cast<acc_t>(x.v[i])",
              "static_cast<acc_t>(static_cast<scalar_t>(a * static_cast<acc_t>(x.v[i])))"),
        tests=(EDGE_TESTS + "test_16bit_forward_sums_in_float32",)),
    Bug("deterministic grad_value not zeroed without queries", "deterministic backward", LAUNCH,
        "    grad_value.zero_();\n    grad_loc.zero_();", "    grad_loc.zero_();",
        tests=(EDGE_TESTS + "test_deterministic_backward_of_empty_problems",)),
    Bug("deterministic corner keys for invalid levels", "deterministic backward", KERNELS,
        *swap("const bool sampled = lv.valid && locate(loc[2 * t], loc[2 * t + 1], lv, cn);",
              "lv.valid && locate", "locate"),
        tests=(EDGE_TESTS + "test_deterministic_backward_skips_invalid_levels",)),
    Bug("real launch macro swaps grid and block", "launch macro", "cuda/launch_check.h",
        *swap("kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__);", "grid), (block", "block), (grid"),
        tests=(EDGE_TESTS + "test_launch_macro_takes_grid_and_block_in_the_real_order",)),
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


def run_tests(csrc: str, cache: str, timeout: float, check: str = "tests",
              tests: tuple[str, ...] = ()) -> tuple[str, float, str]:
    """Return (outcome, seconds, last line): 'passed', 'failed', 'crashed', 'build error' or 'timeout'."""
    env = dict(os.environ, MSDA_EMULATION_CSRC=csrc, MSDA_CACHE_DIR=cache, CI=os.environ.get("CI", "true"))
    # The installed msda (with its CPU kernels, which some tests compare with),
    # unless none is: then the sources' Python package.
    if subprocess.run([sys.executable, "-c", "import msda._C"], capture_output=True).returncode != 0:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(REPO_ROOT, "src"), env.get("PYTHONPATH")) if p)
    if check == "tsan":  # the race detection check instead of the tests
        cmd = [sys.executable, os.path.join(HERE, "tsan_check.py"), "--only", "backward", "forward"]
    else:
        if check == "ubsan-fma":
            env["MSDA_EMULATION_BUILD"] = "ubsan-fma"
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        cmd += [os.path.join(REPO_ROOT, "tests", name) for name in (tests or TEST_FILES)]
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
    if args.tsan:
        bugs = [dataclasses.replace(b, check="tsan") for b in bugs]
    if args.list:
        for b in bugs:
            print(f"{b.kind:22} {b.check:9} {b.name}")
        return 0

    with tempfile.TemporaryDirectory(prefix="msda-inject-") as tmp:
        def fresh_csrc(tag: str) -> tuple[str, str]:
            root = os.path.join(tmp, tag)
            shutil.copytree(os.path.join(REPO_ROOT, "csrc"), os.path.join(root, "csrc"))
            return os.path.join(root, "csrc"), os.path.join(root, "cache")

        for check in sorted({b.check for b in bugs}):  # each check the bugs use, on the unmodified sources
            csrc, cache = fresh_csrc("baseline")
            tests = sorted({t for b in bugs if b.check == check for t in (b.tests or TEST_FILES)})
            outcome, seconds, last = ("passed", 0.0, "") if args.skip_baseline else run_tests(
                csrc, cache, args.timeout, check, tuple(tests))
            print(f"baseline (no bug, {check}): {'skipped' if args.skip_baseline else outcome} in {seconds:.0f} s",
                  flush=True)
            if outcome != "passed":
                print(f"  {last}\nthe unmodified kernels must pass first", file=sys.stderr)
                return 2
            shutil.rmtree(os.path.join(tmp, "baseline"), ignore_errors=True)

        rows = []
        for i, bug in enumerate(bugs):
            csrc, cache = fresh_csrc(f"bug{i}")
            apply(bug, csrc)
            outcome, seconds, last = run_tests(csrc, cache, args.timeout, bug.check, bug.tests)
            verdict = {"failed": "caught", "crashed": "caught (crash)", "passed": "MISSED"}.get(outcome, outcome)
            rows.append((bug, verdict, seconds, last))
            print(f"{verdict:12} {seconds:5.0f} s  {bug.kind:22} {bug.check:9} {bug.name}\n{'':20}{last[:150]}",
                  flush=True)
            shutil.rmtree(os.path.join(tmp, f"bug{i}"), ignore_errors=True)

    print("\n| bug | kind | check | result |\n|---|---|---|---|")
    for bug, verdict, seconds, _ in rows:
        print(f"| {bug.name} | {bug.kind} | {bug.check} | {verdict} ({seconds:.0f} s) |")
    missed = [r for r in rows if not r[1].startswith("caught")]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
