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
python -m pytest tests -q "$@"
