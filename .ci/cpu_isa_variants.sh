#!/usr/bin/env bash
# The CPU kernels have three code paths chosen at compile time: AVX-512,
# AVX2 and a portable one (see csrc/cpu/ms_deform_attn_cpu.cpp). The main
# test run covers whichever this machine's -march=native selects; this script
# builds the other two out of tree and runs the kernel correctness tests
# (randomised comparison with the float64 truth, gradcheck, edge cases,
# determinism) against each, so that no path ships untested.
#
# Uses the environment that scripts/setup_env.sh made (MSDA_VENV, default
# .venv). Each variant is a copy of the sources in a temporary directory,
# built in place there and put first on PYTHONPATH; nothing in the checkout
# or the environment changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSDA_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
export MAX_JOBS="${MAX_JOBS:-2}"
export MSDA_SKIP_CUDA=1
unset MSDA_FORCE_CUDA

if [ "$(uname -m)" != "x86_64" ]; then
  echo "cpu_isa_variants: not an x86_64 machine, nothing to check"
  exit 0
fi

# name, compiler flags, the vector path the build must report
VARIANTS=(
  "avx2|-mavx2 -mfma -mf16c|AVX2"
  "portable|-march=x86-64-v2|portable"
)

for variant in "${VARIANTS[@]}"; do
  IFS='|' read -r name flags expected <<<"$variant"
  work="$(mktemp -d "${TMPDIR:-/tmp}/msda-isa-$name.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/src" "$ROOT/csrc" "$work/"
  rm -f "$work"/src/msda/_C*.so "$work/src/msda/_build_info.py"
  echo "=== cpu_isa_variants: $name build (MSDA_CPU_FLAGS=\"$flags\")"
  (cd "$work" && MSDA_CPU_FLAGS="$flags" "$PYTHON" setup.py -q build_ext --inplace >"$work/build.log" 2>&1) || {
    tail -n 40 "$work/build.log"
    exit 1
  }
  got="$(PYTHONPATH="$work/src" "$PYTHON" -c "import msda._C as c; print(c.vector_path())")"
  if [ "$got" != "$expected" ]; then
    echo "cpu_isa_variants: $name build reports vector path '$got', expected '$expected'" >&2
    exit 1
  fi
  echo "=== cpu_isa_variants: $name kernels ($got) against the float64 truth"
  (cd "$ROOT" && PYTHONPATH="$work/src" MSDA_REQUIRE_EXTENSION=1 OMP_WAIT_POLICY=PASSIVE "$PYTHON" -m pytest -q \
    tests/test_op_vs_reference.py tests/test_gradcheck.py tests/test_edge_cases.py tests/test_determinism.py)
  rm -rf "$work"
  trap - EXIT
done
