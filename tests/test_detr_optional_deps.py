"""A package the example needs but msda does not (Pillow, scipy, pycocotools, onnx, onnxscript,
onnxruntime), when missing, raises an ImportError that names the pip extra to install.

Each case runs in a fresh interpreter where the package is blocked (``sys.modules[name] = None``
makes its import fail as if it were not installed), so this process's modules stay untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from examples.deformable_detr.optional import EXTRAS, needs_extra

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (blocked package, code that needs it, extra the message must name)
CASES = [
    ("PIL", "import examples.deformable_detr.api", "example"),
    ("PIL", "import examples.deformable_detr.predict", "example"),
    ("scipy", "import examples.deformable_detr.matcher", "example"),
    ("pycocotools", "import examples.deformable_detr.evaluate", "example"),
    ("pycocotools", "import examples.deformable_detr.data", "example"),
    ("onnxruntime", "from examples.deformable_detr.export import load_exported; load_exported(__file__, 'onnxruntime')",
     "onnx"),
    ("onnxscript", "from examples.deformable_detr import export\n"
                   "from examples.deformable_detr.configs import tiny_config\n"
                   "from examples.deformable_detr.deformable_detr import build_model\n"
                   "export.export_onnx(build_model(tiny_config()), 'unused.onnx')", "onnx"),
]

RUN_CASES = """
    import json, sys
    import numpy, torch, msda  # extension modules load once: never dropped from sys.modules below
    results = []
    for blocked, code, _ in {cases!r}:
        before = sys.modules.get(blocked)
        sys.modules[blocked] = None  # import of it now fails as if it were not installed
        try:
            exec(compile(code, "<case>", "exec"), {{"__file__": sys.argv[1]}})
            results.append(["no error", ""])
        except ImportError as exc:
            results.append([type(exc).__name__, str(exc)])
        finally:
            if before is None:
                del sys.modules[blocked]
            else:
                sys.modules[blocked] = before
            for name in [n for n in sys.modules if n == "examples" or n.startswith("examples.")]:
                del sys.modules[name]  # the next case imports the example afresh
    print(json.dumps(results))
"""


def test_missing_packages_name_the_extra(tmp_path):
    dummy = tmp_path / "model.onnx"
    dummy.write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *(p for p in sys.path if p)]))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(RUN_CASES.format(cases=CASES)), str(dummy)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (blocked, code, extra), (kind, message) in zip(CASES, results):
        assert kind in ("ImportError", "ModuleNotFoundError"), (code, kind)
        assert f'pip install "msda[{extra}]"' in message, (code, message)
        assert EXTRAS[blocked][0] in message, (code, message)


def test_other_import_errors_pass_unchanged():
    with pytest.raises(ImportError, match="No module named 'not_an_optional_package'"):
        with needs_extra():
            import not_an_optional_package  # noqa: F401
