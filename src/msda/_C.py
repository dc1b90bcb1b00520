"""msda's compiled library, ``msda/libmsda.so``, seen from Python.

The library holds the ops' schemas, the CPU and CUDA kernels and the runtime
CPU dispatch, and no Python: a C++ program (for example one that runs an
AOTInductor package) loads the same file (documentation: "Deployment", C++).
Importing this module loads it with ``torch.ops.load_library``, which runs its
registrations, and reads the CPU dispatch through its C functions (ctypes).
An ImportError means the library is missing or cannot be loaded.
"""

from __future__ import annotations

import ctypes
import os
import warnings

import torch

LIBRARY: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libmsda.so")

if not os.path.exists(LIBRARY):
    raise ImportError(f"{LIBRARY} does not exist")
try:
    torch.ops.load_library(LIBRARY)
    _lib = ctypes.CDLL(LIBRARY)  # the handle load_library opened, one more reference
except OSError as exc:
    raise ImportError(str(exc)) from exc

for _name in ("msda_cpu_capability", "msda_cpu_capabilities_compiled", "msda_cpu_capabilities_allowed",
              "msda_cpu_capability_refusal"):
    getattr(_lib, _name).restype = ctypes.c_char_p
    getattr(_lib, _name).argtypes = []
for _name in ("msda_measure_clock_hz", "msda_measure_clock_hz_multiply"):
    getattr(_lib, _name).restype = ctypes.c_double
    getattr(_lib, _name).argtypes = []
_lib.msda_cpu_cache_release.restype = ctypes.c_int64
_lib.msda_cpu_cache_release.argtypes = []
_lib.msda_cpu_cache_set_limit.restype = ctypes.c_int64
_lib.msda_cpu_cache_set_limit.argtypes = [ctypes.c_int64]
_lib.msda_cpu_cache_stats.restype = None
_lib.msda_cpu_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]


def _names(raw: bytes) -> list[str]:
    return [name for name in raw.decode().split(",") if name]


def cpu_capability() -> str:
    """The CPU kernels in use: 'avx512', 'avx2' or 'default' (MSDA_CPU_CAPABILITY lowers it)."""
    return _lib.msda_cpu_capability().decode()


def cpu_capabilities_compiled() -> list[str]:
    """The CPU capabilities this build carries kernels for, best first."""
    return _names(_lib.msda_cpu_capabilities_compiled())


def cpu_capabilities_allowed() -> list[str]:
    """The compiled CPU capabilities this CPU can run, best first (the values MSDA_CPU_CAPABILITY accepts)."""
    return _names(_lib.msda_cpu_capabilities_allowed())


def cpu_capability_refusal() -> str:
    """Why MSDA_CPU_CAPABILITY was not honoured, or '' (msda warns with it at import)."""
    return _lib.msda_cpu_capability_refusal().decode()


def measure_clock_hz() -> float:
    """The core clock in Hz, measured with a chain of dependent register adds (0 if unknown); used by the benchmarks."""
    return float(_lib.msda_measure_clock_hz())


def measure_clock_hz_multiply() -> float:
    """The core clock in Hz from a chain of dependent 64-bit multiplies (3 cycles each; 0 where that latency
    is not known, that is off x86-64): an independent check of :func:`measure_clock_hz`."""
    return float(_lib.msda_measure_clock_hz_multiply())


def cpu_cache_stats() -> list[int]:
    """The CPU output cache: [idle bytes, idle blocks, limit in bytes, reuses, fresh blocks]."""
    out = (ctypes.c_int64 * 5)()
    _lib.msda_cpu_cache_stats(out)
    return list(out)


def cpu_cache_release() -> int:
    """Free the CPU output cache's idle blocks; returns their bytes."""
    return int(_lib.msda_cpu_cache_release())


def cpu_cache_set_limit(limit_bytes: int) -> int:
    """Set the CPU output cache's idle limit in bytes (0: no caching); returns the previous limit."""
    return int(_lib.msda_cpu_cache_set_limit(int(limit_bytes)))


# Decide the CPU path now, at import, as msda always has (the library itself
# decides at the first kernel call when a C++ program loads it).
cpu_capability()

# MSDA_CPU_CAPABILITIES (plural) chooses what setup.py compiles; set at run
# time it does nothing, which a user who meant MSDA_CPU_CAPABILITY would not notice.
BUILD_VARIABLE_WARNING = (
    "MSDA_CPU_CAPABILITIES is read only when msda is built (it chooses which CPU kernels setup.py compiles) "
    "and has no effect at run time; to choose the CPU kernels of this run, set MSDA_CPU_CAPABILITY "
    "(one of: {allowed})."
)
# MSDA_CPU_CACHE_MB that is not a size in MiB turns the CPU output cache off
# (safer than a cache of a size nobody meant); say so rather than in silence.
_cache_setting = os.environ.get("MSDA_CPU_CACHE_MB", "")
if _cache_setting.strip() and cpu_cache_stats()[2] == 0:
    try:
        _meant_zero = float(_cache_setting) == 0
    except ValueError:
        _meant_zero = False
    if not _meant_zero:
        warnings.warn(
            f"MSDA_CPU_CACHE_MB={_cache_setting!r} is not a size in MiB (a number from 0 to 1e9); "
            "msda's CPU output cache is off. Unset it for the default (256) or give a number.",
            RuntimeWarning, stacklevel=2)

if os.environ.get("MSDA_CPU_CAPABILITIES", "").strip():
    warnings.warn(BUILD_VARIABLE_WARNING.format(allowed=", ".join(cpu_capabilities_allowed())), RuntimeWarning,
                  stacklevel=2)
