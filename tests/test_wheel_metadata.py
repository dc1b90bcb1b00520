"""What a build says about itself (scripts/build_wheel.sh, README "Wheels"):
its version names the torch it was built for, it requires that torch series,
its library carries no debug info; the sources' metadata needs no torch, and
preparing a wheel's metadata without torch stops with advice, before pip
would download a torch."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from msda import _extension
from source_tree import copy_source_tree

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; from setuptools import build_meta; "


def _hook(out_dir, call: str) -> subprocess.CompletedProcess:
    # A PEP 517 hook as pip calls it in an isolated build environment, which has no torch,
    # on a private copy of the sources (the hooks write egg-info into the tree).
    out_dir.mkdir(parents=True, exist_ok=True)
    source = copy_source_tree(out_dir.parent / "msda")
    code = BLOCK_TORCH + call
    return subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=source, capture_output=True, text=True,
                          timeout=300)


def test_wheel_metadata_without_torch_stops_with_advice(tmp_path):
    out = tmp_path / "metadata"
    result = _hook(out, "build_meta.prepare_metadata_for_build_wheel(sys.argv[1])")
    assert result.returncode != 0
    assert "torch is not importable" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr
    assert not list(out.glob("*.dist-info"))


def test_sdist_builds_without_torch_and_ships_no_tests(tmp_path):
    out = tmp_path / "dist"
    result = _hook(out, "print(build_meta.build_sdist(sys.argv[1]))")
    assert result.returncode == 0, result.stderr
    (archive,) = list(out.glob("msda-*.tar.gz"))
    assert re.fullmatch(r"msda-\d+\.\d+\.\d+\.tar\.gz", archive.name)  # the sources: no torch in the version
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    assert "csrc/cpu/capability/ms_deform_attn_kernels.cpp" in names and "csrc/cpu/dispatch.cpp" in names
    # No tests rather than tests without the data they read (tests/data, examples/).
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names), sorted(names)[:20]
    assert "Requires-Dist: torch" in pkg_info


def _installed_distribution():
    """msda's installed distribution, if it is the msda imported here (not an in-place build)."""
    import msda

    try:
        dist = importlib.metadata.distribution("msda")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.read_text("INSTALLER") is None:  # an egg-info left in src/ by a metadata-only run
        return None
    installed = os.path.realpath(str(dist.locate_file("msda/__init__.py")))
    return dist if installed == os.path.realpath(msda.__file__) else None


@pytest.mark.skipif(_installed_distribution() is None, reason="the msda imported here is an in-place build")
def test_installed_version_and_requirement_name_the_torch_series():
    dist = _installed_distribution()
    series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    variant = f"cu{torch.version.cuda.replace('.', '')}" if _extension.BUILD_INFO.WITH_CUDA else "cpu"
    assert dist.version.endswith(f"+torch{series}{variant}"), dist.version
    assert f"torch=={series}.*" in (dist.requires or []), dist.requires


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
@pytest.mark.skipif(getattr(_extension.BUILD_INFO, "DEBUG", False) or "-g" in (_extension.BUILD_INFO.CPU_FLAGS or "").split(),
                    reason="a debug build (MSDA_DEBUG=1, or -g in MSDA_CPU_FLAGS) keeps its debug info")
def test_library_has_no_debug_info():
    sections = subprocess.run(["readelf", "-S", "-W", _extension.EXTENSION.LIBRARY], capture_output=True, text=True,
                              check=True).stdout
    assert ".text" in sections
    assert ".debug_info" not in sections
