"""Finding and loading the compiled extension, or explaining why it is not used.

The extension is only loaded when it was built against the torch that is
running: loading a library built for another torch ABI can crash the process,
so the version recorded at build time (``msda/_build_info.py``, written by
setup.py) is compared first: the release series must match (2.13 for torch
2.13.x), as the wheel's requirement says (documentation: "Installation", Wheels). When the extension cannot be used, the public
functions fall back to the reference with one warning, unless
``MSDA_REQUIRE_EXTENSION=1`` is set (CI sets it), which turns this into an error.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch

REQUIRE_ENV = "MSDA_REQUIRE_EXTENSION"
BUILD_HINT = (
    "Build it with `pip install --no-build-isolation .` in an environment that already has the torch "
    "you run (see the documentation's Installation page, docs/installation.md)."
)


def _series(version: str) -> str:
    """'2.13' for '2.13.0+cpu'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _load() -> tuple[Any, Any, str]:
    """Return (build_info module or None, _C module or None, reason it is unusable or '')."""
    try:
        build_info = importlib.import_module("msda._build_info")
    except ImportError:
        return None, None, "msda was not built with its compiled extension (no msda/_build_info.py)"
    built_for = getattr(build_info, "TORCH_VERSION", "unknown")
    if _series(built_for) != _series(torch.__version__):
        return build_info, None, (
            f"msda's extension was built for torch {built_for}, but torch {torch.__version__} is running"
        )
    try:
        ext = importlib.import_module("msda._C")
    except ImportError as exc:  # missing or unloadable shared library
        return build_info, None, f"msda's compiled extension could not be loaded ({exc})"
    return build_info, ext, ""


BUILD_INFO, EXTENSION, UNAVAILABLE_REASON = _load()
AVAILABLE: bool = EXTENSION is not None

CPU_CAPABILITY_ENV = "MSDA_CPU_CAPABILITY"
# The CPU kernels' instruction set was chosen when _C loaded (csrc/cpu/dispatch.h):
# the best this CPU supports, or a lower one forced with MSDA_CPU_CAPABILITY.
if AVAILABLE and EXTENSION.cpu_capability_refusal():
    warnings.warn(EXTENSION.cpu_capability_refusal(), RuntimeWarning, stacklevel=2)

if not AVAILABLE and os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
    raise ImportError(f"{UNAVAILABLE_REASON}, and {REQUIRE_ENV} is set. {BUILD_HINT}")


def _devices_with_kernels() -> frozenset[str]:
    if not AVAILABLE:
        return frozenset()
    devices = set()
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if torch._C._dispatch_has_kernel_for_dispatch_key("msda::ms_deform_attn_forward", key):
            devices.add(device)
    return frozenset(devices)


# Computed once so that ``device.type in KERNEL_DEVICES`` is a constant for torch.compile.
KERNEL_DEVICES: frozenset[str] = _devices_with_kernels()

_warned: set[str] = set()


def warn_fallback(device_type: str) -> None:
    """Warn once per device type that the slow reference is being used."""
    if device_type in _warned:
        return
    _warned.add(device_type)
    if AVAILABLE:
        reason = f"msda was built without {device_type.upper()} kernels"
    else:
        reason = UNAVAILABLE_REASON
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        raise RuntimeError(f"{reason}, and {REQUIRE_ENV} is set. {BUILD_HINT}")
    warnings.warn(
        f"{reason}; using the pure-PyTorch reference (slow, more memory). {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )
