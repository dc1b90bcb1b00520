#!/usr/bin/env bash
# Compile msda's CUDA kernels in CI, on a machine without a GPU.
#
# Builds the whole extension (CPU and CUDA sources) against a CUDA build of
# torch in its own virtual environment, out of tree (a copy of the sources in
# a temporary directory, so neither src/ nor the CPU venv see any of it), for
# the architectures in $MSDA_CI_CUDA_ARCHS (default "8.0;9.0").
# Fails on a compile error, on any warning located in csrc/cuda, and on any
# kernel that spills registers; prints ptxas' register, spill and shared
# memory figures for every kernel. Then checks the C++ deployment path against
# the CUDA build (.ci/cuda_cpp_link.sh: compile and link only).
#
# Environment: MSDA_CUDA_VENV (default ${XDG_CACHE_HOME:-$HOME/.cache}/msda-ci/venv-cu130),
# MSDA_CUDA_TORCH (default torch==2.14.1), CUDA_HOME (default /usr/local/cuda),
# MAX_JOBS (default 2), MSDA_CI_CUDA_ARCHS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSDA_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/msda-ci/venv-cu130}"
TORCH_SPEC="${MSDA_CUDA_TORCH:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${MSDA_CI_CUDA_ARCHS:-8.0;9.0}"
export MSDA_FORCE_CUDA=1
unset MSDA_SKIP_CUDA

if ! command -v nvcc >/dev/null; then
  echo "cuda_build: nvcc not found (CUDA_HOME=$CUDA_HOME)" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, ninja; assert torch.version.cuda" 2>/dev/null; then
  echo "cuda_build: creating $VENV with $TORCH_SPEC"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$TORCH_SPEC" numpy pybind11 ninja setuptools wheel
fi
"$VENV/bin/python" -c "import torch; print('cuda_build: torch', torch.__version__, 'CUDA', torch.version.cuda)"
nvcc --version | tail -n 2 | head -n 1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/msda-cuda-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# A copy of the sources the build reads: setup.py writes src/msda/_build_info.py.
for item in csrc src setup.py pyproject.toml README.md LICENSE MANIFEST.in; do
  [ -e "$ROOT/$item" ] && cp -r "$ROOT/$item" "$WORK/"
done
find "$WORK/src" \( -name '*.so' -o -name '__pycache__' -o -name '_build_info.py' \) -prune -exec rm -rf {} +

LOG="$WORK/build.log"
start=$(date +%s)
set +e
(cd "$WORK" && "$VENV/bin/python" setup.py build_ext --build-temp "$WORK/build" --build-lib "$WORK/lib") >"$LOG" 2>&1
status=$?
set -e
echo "cuda_build: compiled in $(( $(date +%s) - start )) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (exit $status)"
if [ "$status" -ne 0 ]; then
  grep -E "error|Error" "$LOG" | head -n 60 >&2 || true
  echo "cuda_build: FAILED to compile; the last lines of the log:" >&2
  tail -n 40 "$LOG" >&2
  exit 1
fi

"$VENV/bin/python" - "$LOG" <<'PY'
"""Report ptxas figures per kernel; fail on spills and on csrc/cuda warnings."""
import re
import shutil
import subprocess
import sys

log = open(sys.argv[1], errors="replace").read().splitlines()
problems = []

warnings = [line for line in log if re.search(r"csrc/cuda/[^:( ]+[:(]\d+.*warning", line, re.I)]
for line in warnings:
    problems.append(f"warning in csrc/cuda: {line.strip()}")

rows = []  # (arch, name, registers, stack, spill stores, spill loads, smem)
entry = arch = None
props = {}
for line in log:
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
    if m:
        entry, arch = m.group(1), m.group(2)
        props = {}
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and entry:
        props.update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and entry:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((arch, entry, int(m.group(1)), props.get("stack", 0), props.get("stores", 0),
                     props.get("loads", 0), int(smem.group(1)) if smem else 0))
        entry = None

names = [r[1] for r in rows]
if shutil.which("c++filt") and names:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    pretty = dict(zip(names, out))
else:
    pretty = {n: n for n in names}

def short(name: str) -> str:
    name = pretty[name].replace("msda::cuda_kernels::", "").replace("c10::", "")
    return re.sub(r"\(.*\)$", "", name)

print(f"{'arch':7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} {'smem':>6}  kernel")
for arch, name, regs, stack, stores, loads, smem in sorted(rows, key=lambda r: (r[0], short(r[1]))):
    print(f"{arch:7} {regs:4d} {stack:5d} {stores:8d} {loads:8d} {smem:6d}  {short(name)}")
    if stores or loads:
        problems.append(f"{arch} {short(name)} spills ({stores} bytes stored, {loads} loaded)")
if not rows:
    problems.append("no ptxas figures in the build log (is -Xptxas=-v among the nvcc flags?)")
print(f"cuda_build: {len(rows)} kernels compiled")
for p in problems:
    print("cuda_build: FAIL:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
# The C++ deployment path against this CUDA build: no Python in libmsda.so, the
# smoke program compiles and links with it (about a minute; not run: no GPU).
bash "$ROOT/.ci/cuda_cpp_link.sh" "$WORK/lib/msda/libmsda.so" "$VENV/bin/python"
echo "cuda_build: OK"
