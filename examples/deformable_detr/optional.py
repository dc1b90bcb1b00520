"""The example's packages that msda itself does not need, and the pip extra that installs each.

Imports of them sit inside ``with needs_extra(): ...``: a missing package then raises an
ImportError that says what to install, instead of a bare "No module named 'PIL'".
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["EXTRAS", "needs_extra"]

# import name -> (distribution to install, msda extra that installs it, what the example uses it for)
EXTRAS: dict[str, tuple[str, str, str]] = {
    "PIL": ("Pillow", "example", "reading, resizing and drawing images"),
    "scipy": ("scipy", "example", "the Hungarian matching in training"),
    "pycocotools": ("pycocotools", "example", "COCO datasets and AP"),
    "matplotlib": ("matplotlib", "example", "plots"),
    "onnx": ("onnx", "onnx", "ONNX export"),
    "onnxscript": ("onnxscript", "onnx", "ONNX export"),
    "onnxruntime": ("onnxruntime", "onnx", "running ONNX files"),
}


@contextlib.contextmanager
def needs_extra() -> Iterator[None]:
    """Turn a missing optional package (EXTRAS) into an ImportError naming the extra to install;
    any other import error (a package that is installed but broken) passes unchanged."""
    try:
        yield
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        package, extra, purpose = EXTRAS[top]
        raise ImportError(
            f"the Deformable DETR example needs {package} for {purpose}, and it is not installed: "
            f'pip install "msda[{extra}]" (or pip install {package})',
            name=exc.name,
        ) from exc
