#!/usr/bin/env bash
# The README's test command where a new user runs it: a clone of this
# repository in a temporary directory with nothing beside it (no ../shared,
# no build, no environment), then `bash scripts/test.sh` there, once. The
# suite covers every CPU kernel path through MSDA_CPU_CAPABILITY
# (tests/test_cpu_dispatch.py). Then the wheel of that build
# (scripts/build_wheel.sh, reusing its compiled objects) goes into a fresh
# environment with its torch and runs with each MSDA_CPU_CAPABILITY value
# (.ci/wheel_check.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/msda-bare.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git clone -q --no-hardlinks "$ROOT" "$work/msda"
if [ -e "$work/shared" ]; then
  echo "bare_clone: $work/shared exists; the clone is not alone" >&2
  exit 1
fi
cd "$work/msda"
# The environment lives beside the CI checkout, not in the clone: the later
# stages (.ci/sanitize.sh) use it after the clone is gone. What the suite sees
# is only the clone (msda is installed from it, not linked).
export MSDA_VENV="${MSDA_VENV:-$ROOT/.venv}"
t0=$(date +%s)
MSDA_FILE_TIMES=1 bash scripts/test.sh
echo "=== bare_clone: tests done in $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
bash .ci/wheel_check.sh
echo "=== bare_clone: wheel check done in $(( $(date +%s) - t0 )) s"
