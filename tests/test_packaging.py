"""Packaging basics: version, py.typed, an sdist that carries the C++/CUDA
sources, and a build without torch (an isolated pip build) that stops early
with a message saying what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import msda

from source_tree import copy_source_tree


def test_version_and_typed_marker():
    assert isinstance(msda.__version__, str) and msda.__version__.count(".") == 2
    assert os.path.exists(os.path.join(os.path.dirname(msda.__file__), "py.typed"))


def test_public_api():
    assert set(msda.__all__) >= {"ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttnFunction", "MSDeformAttn"}


def test_sdist_carries_the_sources(tmp_path):
    source, dist = copy_source_tree(tmp_path / "msda"), tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (archive,) = list(dist.glob("msda-*.tar.gz"))
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in ("setup.py", "pyproject.toml", "LICENSE", "README.md", "csrc/msda.cpp", "csrc/checks.h",
                     "csrc/cpu/ms_deform_attn_cpu.cpp", "src/msda/py.typed", "src/msda/ops.py"):
        assert required in names, f"{required} missing from the sdist"
    assert any(n.startswith("csrc/cuda/") for n in names), "CUDA sources missing from the sdist"
    assert "src/msda/_build_info.py" not in names  # written at build time, for the torch it is built against


def test_build_without_torch_stops_early_with_advice(tmp_path):
    # What an isolated `pip install .` meets: no torch in the build environment.
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'bdist_wheel'];"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=copy_source_tree(tmp_path / "msda"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install --no-build-isolation ." in result.stderr
    assert "torch is not importable" in result.stderr
