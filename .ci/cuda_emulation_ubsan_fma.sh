#!/usr/bin/env bash
# The CUDA emulation built the way x86 hides least: UndefinedBehaviorSanitizer
# with every report fatal (a shift by 32 in a warp mask, a float-to-integer
# conversion out of range: undefined on the host, some other value on the
# GPU), and floating-point contraction into fused multiply-adds allowed
# (-ffp-contract=fast -mfma -O2), as nvcc contracts by default. Runs the v2
# emulation tests (the discrete index's exact boundaries and its rounding of
# the product before the + 0.5 among them), the edge tests and a part of v1's,
# against that build (MSDA_EMULATION_BUILD=ubsan-fma, tests/cuda_emulation/build.py).
#
# Uses the environment that scripts/setup_env.sh made (MSDA_VENV, default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSDA_VENV:-$ROOT/.venv}"
export MAX_JOBS="${MAX_JOBS:-2}"
export MSDA_EMULATION_BUILD=ubsan-fma
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# Fewer random examples than the main run: what this build adds is the
# sanitizer and contraction, not more cases.
export MSDA_EMULATION_EXAMPLES="${MSDA_EMULATION_EXAMPLES:-6}"
cd "$ROOT"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_v2_cuda_emulation.py tests/test_cuda_emulation_edges.py \
  "tests/test_cuda_emulation.py::test_each_kernel_variant" "tests/test_cuda_emulation.py::test_capped_grid_runs_grid_stride_rounds" \
  "tests/test_cuda_emulation.py::test_far_and_non_finite_locations_contribute_nothing" \
  "tests/test_cuda_emulation.py::test_wrong_level_tables_skip_the_level_instead_of_reading_out_of_bounds" \
  tests/test_window_edges.py -k "not 2_31"
