#!/usr/bin/env bash
# Installs what it needs (scripts/setup_env.sh) and runs the whole test suite
# against the installed package. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
# Never let the suite pass on the pure-PyTorch fallback.
export MSDA_REQUIRE_EXTENSION=1
cd "$MSDA_ROOT"
python -m pytest tests -q "$@"
