#!/usr/bin/env bash
# The wheel as a user meets it: scripts/build_wheel.sh builds it (with the
# environment scripts/setup_env.sh made), a fresh virtual environment gets its
# torch and the wheel, and from outside the source tree a small forward and
# backward is compared with the float64 reference once per
# MSDA_CPU_CAPABILITY value this CPU allows, each run checking the path it
# used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSDA_VENV:-$ROOT/.venv}"
work="$(mktemp -d "${TMPDIR:-/tmp}/msda-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# Each step prints how long it took.
t0=$(date +%s)
MSDA_WHEEL_DIR="$work/dist" bash "$ROOT/scripts/build_wheel.sh"
echo "== wheel built in $(( $(date +%s) - t0 )) s"
wheel="$(ls "$work"/dist/msda-*.whl)"
case "$(basename "$wheel")" in
  msda-*+torch*) ;;
  *) echo "wheel_check: $(basename "$wheel") does not name its torch" >&2; exit 1 ;;
esac
echo "== fresh environment with $(basename "$wheel")"
"$VENV/bin/python" -m venv "$work/venv"
# The torch the wheel was built for (as scripts/setup_env.sh installs it);
# pip also checks it against the wheel's own requirement.
t0=$(date +%s)
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "${MSDA_TORCH:-torch==2.13.0}" "$wheel"
echo "== fresh environment made in $(( $(date +%s) - t0 )) s"
cd "$work"  # away from the checkout: the installed msda is the one imported
allowed="$("$work/venv/bin/python" -c 'import msda._C as c; print(" ".join(c.cpu_capabilities_allowed()))')"
for capability in $allowed; do
  t0=$(date +%s)
  MSDA_CPU_CAPABILITY="$capability" MSDA_REQUIRE_EXTENSION=1 OMP_WAIT_POLICY=PASSIVE \
    "$work/venv/bin/python" -W error::RuntimeWarning - <<'PYEOF'
import os
import sys

import torch

import msda
from msda import _extension

want = os.environ["MSDA_CPU_CAPABILITY"]
assert os.path.realpath(msda.__file__).startswith(os.path.realpath(sys.prefix)), msda.__file__
got = _extension.EXTENSION.cpu_capability()
assert got == want, f"MSDA_CPU_CAPABILITY={want} ran {got}"
g = torch.Generator().manual_seed(0)
shapes = torch.tensor([[6, 7], [3, 4]])
starts = torch.tensor([0, 42])
N, S, M, D, Lq, L, P = 2, 54, 2, 40, 9, 2, 3
value = torch.randn(N, S, M, D, generator=g, requires_grad=True)
loc = (torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.2 - 0.1).requires_grad_()
attn = torch.rand(N, Lq, M, L, P, generator=g).softmax(-1).requires_grad_()
out = msda.ms_deform_attn(value, shapes, starts, loc, attn)
grads = torch.autograd.grad(out.square().sum(), (value, loc, attn))
ref = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
ref_out = msda.ms_deform_attn_reference(ref[0], shapes, starts, ref[1], ref[2])
ref_grads = torch.autograd.grad(ref_out.square().sum(), ref)
torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
for a, b in zip(grads, ref_grads):
    torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
print(f"   {msda.__version__} from {os.path.dirname(msda.__file__)}: {got} kernels match the float64 reference")
PYEOF
  echo "   ($capability: $(( $(date +%s) - t0 )) s)"
done
