#!/usr/bin/env bash
# Everything msda can check on a machine with a CUDA GPU, in about 5 minutes on
# one GPU, into one JSON file:
#   1. builds msda with its CUDA kernels into the current Python environment
#      (the torch already installed there: a CUDA build of torch is needed);
#   2. runs the CUDA tests: tests/test_cuda_gpu.py (v1) and tests/test_v2_cuda_gpu.py
#      (v2, the deterministic backward, the discrete index's device branch);
#   3. compares CUDA with the CPU kernels and with float64 on randomized cases
#      (v1, the deterministic backward, v2 in both methods, four dtypes);
#   4. times the original Deformable DETR shapes (benchmarks/cases.py) on the
#      GPU: forward and forward+backward, msda against the grid_sample reference.
#
#   bash scripts/gpu_check.sh [OUT.json]     (default gpu_check.json)
#
# Environment: PYTHON (default python3), MAX_JOBS (default: the number of cores),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own), MSDA_GPU_CHECK_QUICK=1 for
# the small benchmark shapes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-gpu_check.json}")"
PY="${PYTHON:-python3}"
cd "$ROOT"
start=$(date +%s)

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no GPU')"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  export TORCH_CUDA_ARCH_LIST
fi
echo "== gpu_check: building msda for sm ${TORCH_CUDA_ARCH_LIST}"
MSDA_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps "$ROOT"
"$PY" -c "from msda import _extension as e; assert 'cuda' in e.KERNEL_DEVICES, e.KERNEL_DEVICES; print('== gpu_check: kernels for', sorted(e.KERNEL_DEVICES))"

echo "== gpu_check: CUDA tests"
TESTS_JSON="$(mktemp)"
trap 'rm -f "$TESTS_JSON"' EXIT
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py tests/test_v2_cuda_gpu.py --junit-xml="$TESTS_JSON.xml"
tests_status=$?
set -e
"$PY" - "$TESTS_JSON.xml" "$TESTS_JSON" "$tests_status" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
summary["exit_status"] = int(sys.argv[3])
summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
json.dump(summary, open(sys.argv[2], "w"))
print("== gpu_check: tests", summary)
PY
rm -f "$TESTS_JSON.xml"

echo "== gpu_check: CUDA against the CPU kernels and float64; benchmarks"
set +e
"$PY" scripts/gpu_check.py --out "$OUT" --tests-json "$TESTS_JSON" ${MSDA_GPU_CHECK_QUICK:+--quick}
check_status=$?
set -e
echo "== gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT"
[ "$tests_status" -eq 0 ] && [ "$check_status" -eq 0 ]
