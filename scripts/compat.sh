#!/usr/bin/env bash
# Checks msda against one torch release: a fresh virtual environment with that
# torch from the package registry, msda built against it (--no-build-isolation,
# CPU kernels only), then the op, module, torch.compile/opcheck and v2 tests.
#
#   bash scripts/compat.sh torch==2.8.0
#
# Each run downloads a full torch (the registry's builds bundle CUDA: 1 to 5 GB)
# and compiles msda (about 10 minutes on 2 cores), so it is run by hand, not in CI.
#
#   MSDA_COMPAT_DIR  where the environments live (default ~/.cache/msda-compat)
#   PYTHON           the interpreter that creates them (default python3)
#   MAX_JOBS         parallel compile jobs (default 2)
# The last line printed is "compat: <torch version>: PASSED|FAILED <date>".
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash scripts/compat.sh TORCH_SPEC   (e.g. torch==2.8.0)" >&2
  exit 2
fi
SPEC="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${MSDA_COMPAT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msda-compat}"
VENV="$BASE/venv-$(echo "$SPEC" | tr -c 'A-Za-z0-9.\n' '_')"
export MAX_JOBS="${MAX_JOBS:-2}"
# The CPU kernels are what every torch build can load; the CUDA kernels have
# their own CI build (.ci/cuda_build.sh).
export MSDA_SKIP_CUDA=1

rm -rf "$VENV"
mkdir -p "$BASE"
"${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "$SPEC" numpy pybind11 ninja "setuptools>=77" wheel pytest hypothesis
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
echo "compat: torch $TORCH_VERSION in $VENV"

# Build from a copy of the sources, so this torch's objects never mix with the
# build/ directory of the repository's own environment.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/msda-compat.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
for item in csrc src setup.py pyproject.toml README.md LICENSE MANIFEST.in; do
  [ -e "$ROOT/$item" ] && cp -r "$ROOT/$item" "$WORK/"
done
find "$WORK/src" \( -name '*.so' -o -name '__pycache__' -o -name '_build_info.py' \) -prune -exec rm -rf {} +

status=0
start=$(date +%s)
if "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps "$WORK"; then
  echo "compat: built in $(( $(date +%s) - start )) s"
  # Run from the tests directory's parent but against the installed package:
  # the tests import msda, never src/.
  (cd "$ROOT" && MSDA_REQUIRE_EXTENSION=1 HYPOTHESIS_PROFILE=ci OMP_WAIT_POLICY=PASSIVE "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_op_vs_reference.py tests/test_module.py tests/test_compile_and_opcheck.py \
      tests/test_v2_op.py tests/test_v2_compile.py) || status=$?
else
  echo "compat: build FAILED" >&2
  status=1
fi
if [ "$status" -eq 0 ]; then result=PASSED; else result=FAILED; fi
echo "compat: torch $TORCH_VERSION: $result $(date -u +%Y-%m-%d)"
exit "$status"
