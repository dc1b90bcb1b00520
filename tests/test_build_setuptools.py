"""Building with a setuptools older than 77 under --no-build-isolation (pip then uses the
environment's setuptools, not pyproject's requirement) stops with msda's message saying which
setuptools to install, not with setuptools' schema error about ``project.license``."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_PY = os.path.join(REPO, "setup.py")


def check_setuptools():
    """setup.py's _check_setuptools, taken from its source (importing setup.py would run setup())."""
    tree = ast.parse(open(SETUP_PY, encoding="utf-8").read())
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name == "_check_setuptools")
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "MIN_SETUPTOOLS" for t in n.targets))]
    scope: dict = {"sys": sys}
    exec(compile(ast.Module(body=keep, type_ignores=[]), SETUP_PY, "exec"), scope)
    return scope["_check_setuptools"]


def test_check_function(capsys):
    check = check_setuptools()
    check("77.0.3")
    check("84.2.1")
    with pytest.raises(SystemExit):
        check("68.0.0")
    err = capsys.readouterr().err
    assert 'pip install "setuptools>=77"' in err and "setuptools 68.0.0" in err


@pytest.mark.slow
def test_old_setuptools_build_gives_msdas_message(tmp_path):
    """A real build in a fresh virtual environment whose setuptools is the one its Python bundles
    (65.5 for Python 3.11), with this environment's torch visible through a .pth file."""
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment: {made.stderr[-500:]}")
    python = str(venv / "bin" / "python")
    version = subprocess.run([python, "-c", "import setuptools; print(setuptools.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    if not version or int(version.split(".")[0]) >= 77:
        pytest.skip(f"this Python's venv brings no setuptools older than 77 (got {version or 'none'})")
    import torch

    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # appended after the venv's own site-packages: torch from here, setuptools still the old one
    with open(os.path.join(site, "zz_torch.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    source = tmp_path / "msda"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "src"), source / "src", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, MSDA_SKIP_CUDA="1", PIP_NO_INDEX="1")
    done = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", str(source)],
                          capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"msda: building needs setuptools>=77; this environment has setuptools {version}" in output, output[-3000:]
    assert "project.license" not in output, output[-3000:]
