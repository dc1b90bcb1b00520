#!/usr/bin/env bash
# Installs what it needs (scripts/setup_env.sh) and runs the whole test suite
# against the installed package. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
# Never let the suite pass on the pure-PyTorch fallback.
export MSDA_REQUIRE_EXTENSION=1
# Idle OpenMP threads sleep instead of spinning, so that tests running beside
# other work (torchrun workers, a busy CI machine) do not stall each other.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cd "$MSDA_ROOT"
# Test files run side by side in worker processes (pytest-xdist), one per core
# up to 4: most of the suite's time is single-threaded Python (imports, exports,
# child processes), so on 2 cores this about halves it. A file stays in one
# worker, so its module fixtures (exports, builds) are made once.
# MSDA_TEST_WORKERS=0 runs everything in this one process.
workers="${MSDA_TEST_WORKERS:-$(python -c 'import os
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS: no affinity
print(min(4, cores or 1))')}"
python -m pytest tests -q -n "$workers" --dist loadfile "$@"
