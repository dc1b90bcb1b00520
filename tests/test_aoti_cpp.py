"""A C++ program without Python runs an AOTInductor package of one
MSDeformAttn layer, loading only msda's library (libmsda.so) for the ops.

The test exports the layer (tiny shapes), packages it with
``torch._inductor.aoti_compile_and_package``, saves the inputs and the eager
output as raw files, builds tests/cpp/aoti_smoke.cpp against the running
torch's headers and libraries, and runs it: once loading libmsda.so (the
output must match eager), once without (the package must fail to find msda's
op, so the first run's success is msda's library at work).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

import msda
from msda import _extension

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = [
    pytest.mark.skipif(not _extension.AVAILABLE, reason="needs msda's compiled library"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the smoke program uses dlopen (Linux)"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler"),
]


def _save(directory, name: str, tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous()
    dtype = {torch.float32: "float32", torch.int64: "int64"}[tensor.dtype]
    tensor.numpy().tofile(os.path.join(directory, name))
    return " ".join([name, dtype, str(tensor.dim())] + [str(s) for s in tensor.shape])


def _build(directory) -> str:
    torch_dir = os.path.dirname(torch.__file__)
    binary = os.path.join(directory, "aoti_smoke")
    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{d}" for d in cpp_extension.include_paths()]
    libs = os.path.join(torch_dir, "lib")
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
           os.path.join(HERE, "cpp", "aoti_smoke.cpp"), "-o", binary, f"-L{libs}", f"-Wl,-rpath,{libs}",
           "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return binary


@pytest.mark.slow
def test_cpp_program_runs_aoti_package_with_msda_library(tmp_path):
    torch.manual_seed(0)
    layer = msda.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).eval()
    with torch.no_grad():  # non-trivial offsets and weights, some points off the map
        layer.sampling_offsets.weight.normal_(0, 0.5)
        layer.attention_weights.weight.normal_(0, 0.5)
    shapes = torch.tensor([[4, 5], [2, 3]], dtype=torch.int64)
    start = torch.tensor([0, 20], dtype=torch.int64)
    inputs = (torch.randn(1, 6, 16), torch.rand(1, 6, 2, 2), torch.randn(1, 26, 16), shapes, start)
    with torch.no_grad():
        expected = layer(*inputs)
        package = torch._inductor.aoti_compile_and_package(
            torch.export.export(layer, inputs), package_path=str(tmp_path / "layer.pt2"))

    lines = [_save(tmp_path, f"input{i}.bin", t) for i, t in enumerate(inputs)]
    lines.append(_save(tmp_path, "expected.bin", expected))
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    binary = _build(str(tmp_path))
    library = _extension.EXTENSION.LIBRARY

    def run(lib: str) -> subprocess.CompletedProcess:
        # The program must not find Python or msda's Python package through its environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        return subprocess.run([binary, lib, package, str(manifest), "1e-5"], capture_output=True, text=True,
                              timeout=300, env=env)

    done = run(library)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max abs difference from eager" in done.stdout

    without = run("none")
    assert without.returncode != 0, without.stdout
    assert "msda" in without.stderr, without.stderr


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_library_needs_no_python():
    """libmsda.so must load in a process without Python: no libpython or
    libtorch_python among its needed libraries, no Python symbol undefined."""
    library = _extension.EXTENSION.LIBRARY
    dynamic = subprocess.run(["readelf", "-d", "-W", library], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    assert not [lib for lib in needed if "python" in lib], needed
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", library], capture_output=True, text=True,
                             check=True).stdout
    undefined_python = [line.split()[-1] for line in symbols.splitlines()
                        if " UND " in line and line.split()[-1].startswith(("Py", "_Py"))]
    assert not undefined_python, undefined_python
    for name in ("msda_cpu_capability", "msda_cpu_capabilities_allowed", "msda_measure_clock_hz",
                 "msda_measure_clock_hz_multiply"):
        assert name in symbols, name
