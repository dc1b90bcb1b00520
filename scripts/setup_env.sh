# Sourced by scripts/test.sh and scripts/demo.sh: creates (or reuses) a virtual
# environment, installs msda's dependencies and builds msda into it.
#
#   MSDA_VENV     where the environment lives (default: .venv in the repository)
#   MSDA_TORCH    the torch requirement (default: torch==2.13.0, the CPU build)
#   PYTHON        the interpreter that creates the environment (default: python3)
#   MAX_JOBS      parallel compile jobs (default: 2)
set -euo pipefail
MSDA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$MSDA_ROOT"
MSDA_VENV="${MSDA_VENV:-$MSDA_ROOT/.venv}"
if [ ! -x "$MSDA_VENV/bin/python" ]; then
  echo "== creating virtual environment $MSDA_VENV"
  "${PYTHON:-python3}" -m venv "$MSDA_VENV"
fi
# shellcheck disable=SC1091
. "$MSDA_VENV/bin/activate"
echo "== installing dependencies"
python -m pip install -q --disable-pip-version-check --upgrade pip
# One group a line, each with why it is here: the build tools and pyproject's `test`
# extra (tests/test_optional_extras.py checks that this list covers it).
DEPS=(
  "${MSDA_TORCH:-torch==2.13.0}" numpy             # the op
  pybind11 ninja "setuptools>=77" wheel           # the build
  pytest pytest-xdist hypothesis "tomli;python_version<'3.11'"  # the tests (xdist: test files in parallel workers; tomli: pyproject.toml on Python 3.10)
  scipy pillow pycocotools matplotlib             # the example detector (matching, images, COCO AP, plots)
  onnx onnxscript onnxruntime                     # ONNX export (msda.onnx) and running the exported graphs
  transformers==5.24.0 mmcv-lite==2.2.0 kernels==0.17.2  # msda.integrations tests: HF models, mmcv's real module, kernels' kernelize;
                                                        # transformers also for the v2 op against its multi_scale_deformable_attention_v2
)
python -m pip install -q --disable-pip-version-check "${DEPS[@]}"
echo "== building msda against torch $(python -c 'import torch; print(torch.__version__)')"
# --no-build-isolation: compile against the torch installed above (see README).
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps "$MSDA_ROOT"
python -m msda info
