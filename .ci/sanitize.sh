#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: builds
# the extension out of tree with -fsanitize=address,undefined and runs the
# kernel tests and the fuzz test against it. Any report fails the run.
#
# * -fno-wrapv: Python's build flags carry -fwrapv, which defines signed
#   overflow, so GCC would drop UBSan's overflow check (an unchecked h*w in
#   the level checks stayed invisible that way).
# * -fno-sanitize-recover=all: the first report ends the process, so pytest
#   fails; the log is also searched for reports, in case one came from a
#   process that did not fail the run.
# * libasan must come first in the process: it is preloaded into Python, with
#   libstdc++ (without it, C++ exceptions thrown by the kernels' argument
#   checks abort instead of reaching Python).
# * ASAN_OPTIONS: detect_leaks=0 (Python's own allocations live until exit);
#   allocator_may_return_null=1 (tests that ask for absurd sizes get a clean
#   allocation error instead of an ASan abort).
#
# Uses the environment that scripts/setup_env.sh made (MSDA_VENV, default
# .venv). The build is a copy of the sources in a temporary directory, put
# first on PYTHONPATH; nothing in the checkout or the environment changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSDA_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
export MAX_JOBS="${MAX_JOBS:-2}"
export MSDA_SKIP_CUDA=1
unset MSDA_FORCE_CUDA

# -O1 builds in about half the time of the default -O3 and keeps the stack
# traces readable; the sanitizers' checks do not depend on it.
SANITIZE="-fsanitize=address,undefined -fno-wrapv -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g"
# The kernel tests: everything that runs the CPU kernels on many shapes and
# values, and the fuzz test. (tests/test_large.py is left out: its huge
# uninitialised allocations cost nothing normally, but not under ASan.)
# The three slowest cases (about 25 s of the normal run, three times that
# here) are left out: other cases run the same code paths (wide channels at
# D = 1025, gradcheck at D = 1..32 and in the original's case). So are the
# cache's environment tests: each starts a fresh Python (slow under ASan) to
# parse a variable: plain parsing, no kernel and no memory handling; the
# normal run checks it.
# Arguments, if given, replace this selection (e.g. `tests/test_edge_cases.py -k overflow`).
TESTS=(tests/test_op_vs_reference.py tests/test_gradcheck.py tests/test_edge_cases.py tests/test_errors.py
       tests/test_zero_sizes.py tests/test_determinism.py tests/test_fuzz.py
       tests/test_v2_edge_cases.py tests/test_v2_op.py tests/test_cpu_cache.py
       --deselect "tests/test_op_vs_reference.py::test_wide_channels[dtype0-4096]"
       --deselect "tests/test_gradcheck.py::test_gradcheck_float64[64]"
       --deselect "tests/test_gradcheck.py::test_gradcheck_float64[71]"
       --deselect "tests/test_cpu_cache.py::test_environment_sets_the_limit")
[ "$#" -gt 0 ] && TESTS=("$@")

work="$(mktemp -d "${TMPDIR:-/tmp}/msda-sanitize.XXXXXX")"
# MSDA_SANITIZE_KEEP=1 keeps the build directory (to look into a report).
[ -n "${MSDA_SANITIZE_KEEP:-}" ] && echo "=== sanitize: keeping $work" || trap 'rm -rf "$work"' EXIT
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/src" "$ROOT/csrc" "$work/"
rm -f "$work"/src/msda/_C*.so "$work"/src/msda/libmsda.so "$work/src/msda/_build_info.py"

echo "=== sanitize: building the CPU extension with $SANITIZE"
t0=$(date +%s)
# setup.py appends MSDA_CPU_FLAGS to the compile flags; distutils appends
# LDFLAGS to the link command, which must link the sanitizer runtimes too.
# Only the best path this CPU allows (plus the baseline, always compiled) is
# built: it is the one the tests run, and the build takes half the time.
best="$("$PYTHON" -c 'import msda._C as c; print(c.cpu_capabilities_allowed()[0])' 2>/dev/null || echo default)"
(cd "$work" && MSDA_CPU_CAPABILITIES="$best" MSDA_CPU_FLAGS="$SANITIZE" LDFLAGS="-fsanitize=address,undefined" \
  "$PYTHON" setup.py -q build_ext --inplace >"$work/build.log" 2>&1) || {
  tail -n 40 "$work/build.log"
  exit 1
}
echo "=== sanitize: built in $(( $(date +%s) - t0 )) s"
# The runtimes must be linked in (UBSan's is not preloaded).
linked="$(ldd "$work"/src/msda/libmsda.so)"
for runtime in libasan libubsan; do
  grep -q "$runtime" <<<"$linked" || { echo "sanitize: the build does not link $runtime" >&2; exit 1; }
done

# The CUDA emulation (used by some of these tests) is built first, without
# the sanitizer runtime in the compiler's processes.
(cd "$ROOT" && "$PYTHON" -c "import sys; sys.path.insert(0, 'tests/cuda_emulation'); from build import load_emulation; load_emulation()")

ASAN_LIB="$(gcc -print-file-name=libasan.so)"
STDCXX_LIB="$(gcc -print-file-name=libstdc++.so.6)"
for lib in "$ASAN_LIB" "$STDCXX_LIB"; do
  [ -e "$lib" ] || { echo "sanitize: $lib not found" >&2; exit 1; }
done

run_sanitized() {
  (cd "$ROOT" && LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" \
    ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1" \
    UBSAN_OPTIONS="print_stacktrace=1" \
    PYTHONPATH="$work/src" MSDA_REQUIRE_EXTENSION=1 OMP_WAIT_POLICY=PASSIVE "$PYTHON" "$@")
}

# The sanitized library must be the one the tests load.
got="$(run_sanitized -c "import msda._C as c; print(c.LIBRARY)")"
case "$got" in
  "$work"/*) ;;
  *) echo "sanitize: the tests would load $got, not the sanitized build" >&2; exit 1 ;;
esac

echo "=== sanitize: ${TESTS[*]}"
status=0
# --capture=sys: pytest captures Python's output only, so that a report the
# sanitizers write to file descriptor 2 reaches the log even when it aborts
# the process (fd-level capture would swallow it).
run_sanitized -m pytest -q --capture=sys -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$work/test.log" || status=$?
if grep -qE "ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer|ERROR: LeakSanitizer" "$work/test.log"; then
  echo "sanitize: the sanitizers reported an error (see above)" >&2
  exit 1
fi
exit "$status"
