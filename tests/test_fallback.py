"""When the compiled extension is missing or was built for another torch,
`import msda` still works and the ops fall back to the reference with one
warning that says why and how to build; MSDA_REQUIRE_EXTENSION=1 makes that
an error. Each scenario runs on a copy of the installed package in a
subprocess, so the copy under test is really the one imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import msda

SCRIPT = textwrap.dedent(
    """
    import warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import msda
        shapes = torch.tensor([[3, 4]]); starts = torch.tensor([0])
        value = torch.rand(1, 12, 2, 3); loc = torch.rand(1, 5, 2, 1, 2, 2); attn = torch.rand(1, 5, 2, 1, 2)
        out1 = msda.ms_deform_attn(value, shapes, starts, loc, attn)
        out2 = msda.MSDeformAttnFunction.apply(value, shapes, starts, loc, attn, 64)
    want = msda.ms_deform_attn_reference(value, shapes, starts, loc, attn)
    assert torch.equal(out1, want) and torch.equal(out2, want)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("WARNINGS", len(messages))
    for m in messages: print("MESSAGE", m)
    """
)


def _copy_package(tmp_path, mutate):
    source = os.path.dirname(msda.__file__)
    target = tmp_path / "site" / "msda"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    mutate(target)
    return tmp_path / "site"


def _run(site, require=False):
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("MSDA_REQUIRE_EXTENSION", None)
    if require:
        env["MSDA_REQUIRE_EXTENSION"] = "1"
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def _other_torch(target):
    info = target / "_build_info.py"
    text = info.read_text()
    lines = [l if not l.startswith("TORCH_VERSION") else "TORCH_VERSION = '1.0.0'" for l in text.splitlines()]
    info.write_text("\n".join(lines) + "\n")


def _no_extension(target):
    os.remove(target / "libmsda.so")


def _never_built(target):
    _no_extension(target)
    os.remove(target / "_build_info.py")


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (_other_torch, "built for torch 1.0.0, but torch"),
        (_no_extension, "compiled extension could not be loaded"),
        (_never_built, "msda was not built with its compiled extension"),
    ],
    ids=["other-torch", "missing-library", "never-built"],
)
def test_falls_back_with_one_warning(tmp_path, mutate, reason):
    site = _copy_package(tmp_path, mutate)
    result = _run(site)
    assert result.returncode == 0, result.stderr
    assert "WARNINGS 1" in result.stdout, result.stdout
    assert reason in result.stdout and "pip install --no-build-isolation" in result.stdout, result.stdout


@pytest.mark.parametrize("mutate", [_other_torch, _no_extension], ids=["other-torch", "missing-library"])
def test_required_extension_makes_fallback_an_error(tmp_path, mutate):
    site = _copy_package(tmp_path, mutate)
    result = _run(site, require=True)
    assert result.returncode != 0
    assert "MSDA_REQUIRE_EXTENSION is set" in result.stderr, result.stderr


def test_this_run_uses_the_compiled_kernels():
    # The suite itself must never pass on the fallback.
    from msda import _extension

    assert _extension.AVAILABLE, _extension.UNAVAILABLE_REASON
    assert "cpu" in _extension.KERNEL_DEVICES


def test_info_command_reports_the_build():
    result = subprocess.run([sys.executable, "-m", "msda", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"msda {msda.__version__}" in result.stdout
    assert "extension: loaded; kernels for cpu" in result.stdout
    assert "CPU output cache: up to " in result.stdout
    assert "compiler:" in result.stdout and "cpu capability:" in result.stdout
