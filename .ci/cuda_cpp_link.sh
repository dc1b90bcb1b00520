#!/usr/bin/env bash
# C++ deployment against a CUDA build, on a machine without a GPU: checks that a
# CUDA-built libmsda.so needs no Python and that tests/cpp/aoti_smoke.cpp (the
# C++ AOTInductor smoke program) compiles and links against the CUDA torch with
# that library on its link line, so every symbol libmsda.so takes from torch's
# libraries (libc10, libtorch_cpu, libc10_cuda) and the CUDA runtime resolves.
# Nothing is run: that needs a GPU (README "C++ deployment").
#
# Usage: cuda_cpp_link.sh LIBMSDA_SO PYTHON   (PYTHON: the CUDA venv's interpreter)
set -euo pipefail

LIB="$1"
PY="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

needed="$(readelf -d -W "$LIB" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
echo "cuda_cpp_link: $(basename "$LIB") needs: $(echo $needed)"
if echo "$needed" | grep -qi python; then
  echo "cuda_cpp_link: FAIL: libmsda.so needs a Python library" >&2
  exit 1
fi
if ! echo "$needed" | grep -Eq '^(libtorch_cuda|libc10_cuda|libcudart)\.so'; then
  echo "cuda_cpp_link: FAIL: libmsda.so is not a CUDA build (no CUDA library among its needed libraries)" >&2
  exit 1
fi
if readelf --dyn-syms -W "$LIB" | awk '$7 == "UND" {print $8}' | grep -E '^_?Py' >&2; then
  echo "cuda_cpp_link: FAIL: libmsda.so takes the Python symbols above" >&2
  exit 1
fi

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"  # cpp_extension warns without it
read -r TORCH_LIB ABI INCLUDES < <("$PY" - <<'PY'
import os
import torch
from torch.utils import cpp_extension
print(os.path.join(os.path.dirname(torch.__file__), "lib"), int(torch.compiled_with_cxx11_abi()),
      " ".join("-I" + d for d in cpp_extension.include_paths()))
PY
)
OUT="$(mktemp -d "${TMPDIR:-/tmp}/msda-cuda-cpp.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)
# --no-as-needed keeps libmsda.so (no symbol is taken from it): the linker then
# resolves its undefined symbols against the CUDA torch libraries (and theirs,
# found through their own run paths).
# shellcheck disable=SC2086
"${CXX:-c++}" -std=c++20 -O1 -D_GLIBCXX_USE_CXX11_ABI="$ABI" $INCLUDES \
  "$ROOT/tests/cpp/aoti_smoke.cpp" -o "$OUT/aoti_smoke" \
  -L"$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" -Wl,--no-as-needed "$LIB" -Wl,--as-needed \
  -ltorch -ltorch_cpu -ltorch_cuda -lc10 -ldl
echo "cuda_cpp_link: aoti_smoke compiled and linked against the CUDA torch and $(basename "$LIB") in $(( $(date +%s) - start )) s (not run: needs a GPU)"
