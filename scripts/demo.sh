#!/usr/bin/env bash
# The main job: installs what it needs (scripts/setup_env.sh), then checks the
# compiled kernels against the reference and reports the speedup.
# Extra arguments go to the demo.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$MSDA_ROOT"
python benchmarks/quick_check.py "$@"
