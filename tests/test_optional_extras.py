"""Optional dependencies are declared as extras, installed by the set-up script
the tests use, and named when missing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

try:  # Python 3.11+; on 3.10 the set-up script installs tomli
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

import msda.onnx

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def _expanded(extra: str) -> set[str]:
    names = set()
    for requirement in EXTRAS[extra]:
        if _name(requirement) == "msda":  # msda[a,b]: the extras it names
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= _expanded(inner.strip())
        else:
            names.add(_name(requirement))
    return names


def test_the_documented_extras_exist() -> None:
    assert {"example", "onnx", "bench", "docs", "test", "integrations", "build"} <= set(EXTRAS)
    assert {"scipy", "pillow", "pycocotools"} <= _expanded("example")
    assert {"onnx", "onnxscript", "onnxruntime"} <= _expanded("onnx")


def test_setup_env_installs_the_test_extra() -> None:
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    deps = script[script.index("DEPS=("):script.index("\n)\n")]
    installed = {_name(word.strip('"')) for line in deps.splitlines()[1:]
                 for word in line.split("#")[0].split()}
    assert _expanded("test") - {"msda"} <= installed, _expanded("test") - installed


@pytest.mark.parametrize("missing", ["onnxscript", "onnx"])
def test_msda_onnx_names_the_extra_when_a_package_is_missing(monkeypatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import of it raises ImportError
    if missing == "onnx":
        call = lambda: msda.onnx._register_tensorrt_schema("msda.test.missing")  # noqa: E731
    else:
        call = msda.onnx.translation_table
    with pytest.raises(ImportError, match=re.escape("pip install 'msda[onnx]'")):
        call()
