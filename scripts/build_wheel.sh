#!/usr/bin/env bash
# Builds msda's binary wheel for the torch of an environment, into dist/.
#
# The wheel is honest about what it is: its version names the torch it was
# built for and its kernels (0.1.0+torch2.13cpu, 0.1.0+torch2.14cu130), its
# metadata requires that torch release series (torch==2.13.*: the binary loads
# with no other), its library has no debug info, and it carries the CPU
# kernels of every x86-64 capability (AVX-512, AVX2, baseline), chosen when it
# loads: it runs on any x86-64 CPU. A CUDA wheel records its CUDA version (in
# the version) and architectures (msda/_build_info.py; `python -m msda info`).
#
#   MSDA_VENV            the environment whose torch the wheel is for (default
#                        .venv, made by scripts/setup_env.sh when missing)
#   MSDA_WHEEL_DIR       where the wheel goes (default dist/)
#   TORCH_CUDA_ARCH_LIST, MSDA_SKIP_CUDA, MSDA_CPU_CAPABILITIES, MAX_JOBS:
#                        as for any build (README: "Build options")
#
# Then, for a manylinux tag: auditwheel repair with torch's libraries left out
# (README: "Wheels").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${MSDA_WHEEL_DIR:-$ROOT/dist}"
VENV="${MSDA_VENV:-$ROOT/.venv}"
case " ${MSDA_CPU_FLAGS:-} " in
  *" -march="* | *" -mavx"* | *" -mcpu="*)
    echo "build_wheel: MSDA_CPU_FLAGS=\"$MSDA_CPU_FLAGS\" would tie the wheel to CPUs like this one; unset it" >&2
    exit 1
    ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  # shellcheck source=scripts/setup_env.sh
  source "$ROOT/scripts/setup_env.sh"
fi
PY="$VENV/bin/python"
# The environment's own tools first, as when it is activated (scripts/setup_env.sh
# builds msda that way): its ninja then finds the objects of an earlier build in
# build/ up to date. Another ninja (an older system one) cannot read that ninja's
# log and recompiles everything (172 s instead of 7 on a 2-core machine).
export PATH="$VENV/bin:$PATH"
mkdir -p "$OUT"
echo "== building the wheel against torch $("$PY" -c 'import torch; print(torch.__version__)')"
# --no-build-isolation: compile against this environment's torch (README).
MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -w "$OUT" "$ROOT"
wheel="$(ls -t "$OUT"/msda-*.whl | head -n 1)"
echo "== $wheel"
"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith(("Version:", "Requires-Dist:")):
            print("   ", line)
PYEOF
