#!/usr/bin/env bash
# Race detection for the CUDA kernels without a GPU: builds the CUDA
# emulation with ThreadSanitizer and its fiber, barrier and atomic
# annotations (tests/cuda_emulation/race_detection.h) and runs
# tests/cuda_emulation/tsan_check.py: deliberately racy kernels (a plain +=
# in place of atomicAdd, shared memory read or written on the wrong side of a
# barrier) must be reported, msda's real kernels (v1's, the deterministic
# backward's and the v2 op's) must not.
#
# Uses the environment that scripts/setup_env.sh made (MSDA_VENV, default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSDA_VENV:-$ROOT/.venv}"
export MAX_JOBS="${MAX_JOBS:-2}"
cd "$ROOT"
"$VENV/bin/python" tests/cuda_emulation/tsan_check.py
