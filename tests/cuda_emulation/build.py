"""Build (or reuse) the CUDA emulation harness as a Python module.

The harness compiles the CUDA kernels' device code and host launch code
(csrc/cuda) as host C++ together with tests/cuda_emulation/cuda_emulation.h,
with torch.utils.cpp_extension.load. The build directory is under
$MSDA_CACHE_DIR (default ~/.cache/msda), so ninja reuses it across runs.
$MSDA_EMULATION_CSRC points the build at another copy of csrc (the bug
injection script uses it); each csrc gets its own build directory.
"""

from __future__ import annotations

import hashlib
import os
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


def cache_dir() -> str:
    return os.environ.get("MSDA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "msda")


def load_emulation(csrc: str | None = None, verbose: bool = False, entry: str = "emulated_ops.cpp") -> ModuleType:
    """Compile (if needed) and import the emulation module for `csrc`; `entry`
    picks the op (emulated_ops_v2.cpp: the v2 op of issue 13)."""
    from torch.utils import cpp_extension

    csrc = os.path.abspath(csrc or os.environ.get("MSDA_EMULATION_CSRC") or os.path.join(REPO_ROOT, "csrc"))
    tag = hashlib.sha1(csrc.encode()).hexdigest()[:10]
    name = f"msda_cuda_emulation_{tag}"
    if entry != "emulated_ops.cpp":
        name += "_" + os.path.splitext(entry)[0]
    build_dir = os.path.join(cache_dir(), "cuda_emulation", name)
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    return cpp_extension.load(
        name=name,
        sources=[os.path.join(HERE, entry)],
        extra_include_paths=[csrc, HERE],
        # -O1 keeps the build short; the emulation's speed is in its fibers.
        extra_cflags=["-O1", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas"],  # "#pragma unroll"
        build_directory=build_dir,
        verbose=verbose,
    )
