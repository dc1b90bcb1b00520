"""Build script for msda's compiled extension ``msda._C``.

The extension is compiled against the torch that is installed, so build with
``pip install --no-build-isolation .`` (an isolated build would fetch some
other torch and produce a library that cannot be loaded by yours).

Environment variables:

* ``MSDA_SKIP_CUDA=1``: never build the CUDA kernels.
* ``MSDA_FORCE_CUDA=1``: build the CUDA kernels even without a visible GPU
  (needs a CUDA build of torch and nvcc).
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures, e.g. "8.0;9.0". Without a GPU
  and without this variable a default list is used (see DEFAULT_CUDA_ARCHS).
* ``MAX_JOBS``: parallel compile jobs (ninja).
* ``MSDA_CPU_FLAGS``: code-generation flags for the CPU kernels, default
  ``-march=native`` (the machine you build on). Use e.g.
  ``"-mavx2 -mfma -mf16c"`` or ``"-march=x86-64-v2"`` for a wheel that runs elsewhere.
* ``MSDA_DEBUG=1``: -O0 -g builds.
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc 13 supports sm_75 .. sm_121; PTX of the newest lets future GPUs JIT it.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"

# Commands that only describe the package need neither torch nor a compiler.
METADATA_ONLY = {"sdist", "egg_info", "dist_info", "--version", "--name", "check", "clean"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _read_version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "src", "msda", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _import_torch():
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError:
        sys.stderr.write(
            "\nmsda: torch is not importable in this build environment.\n"
            "msda's kernels must be compiled against the torch you will run, so build it with\n"
            "build isolation turned off, in the environment that has your torch:\n\n"
            "    pip install torch            # if you have not already\n"
            "    pip install pybind11 ninja setuptools wheel\n"
            "    pip install --no-build-isolation .\n\n"
        )
        raise SystemExit(1)
    import torch
    from torch.utils import cpp_extension

    return torch, cpp_extension


def _compiler_description() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError):
        return cxx


def _want_cuda(torch, cpp_extension) -> tuple[bool, str]:
    if _env_flag("MSDA_SKIP_CUDA"):
        return False, "MSDA_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if _env_flag("MSDA_FORCE_CUDA") or torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, "CUDA kernels enabled"
    return False, "no GPU visible (set MSDA_FORCE_CUDA=1 to build anyway)"


def _torch_bundled_cuda_includes(torch) -> list[str]:
    """CUDA builds of torch ship cuBLAS/cuSPARSE headers (which torch's own CUDA
    headers include) in site-packages/nvidia/*/include; a bare toolkit may lack them."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def _write_build_info(torch, with_cuda: bool, cuda_archs: str) -> None:
    path = os.path.join(ROOT, "src", "msda", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; compared with the running torch before loading _C.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"COMPILER = {_compiler_description()!r}\n")
        f.write(f"CPU_FLAGS = {os.environ.get('MSDA_CPU_FLAGS', '-march=native')!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {cuda_archs!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n")


def _extensions():
    torch, cpp_extension = _import_torch()
    debug = _env_flag("MSDA_DEBUG")
    with_cuda, why = _want_cuda(torch, cpp_extension)
    print(f"msda: building against torch {torch.__version__}; CUDA: {why}")

    cpu_flags = shlex.split(os.environ.get("MSDA_CPU_FLAGS", "-march=native"))
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        cpu_flags = []
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is inlined into our code: it needs OpenMP to use threads.
    cxx_flags += ["-fopenmp", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    # torch's vector headers make GCC report `#pragma unroll` (meant for other
    # compilers) and a false "may be used uninitialized" inside GCC's own
    # AVX-512 intrinsics; neither is in msda's code.
    cxx_flags += ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    cxx_flags += cpu_flags
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link_args = ["-fopenmp"]
    define_macros: list[tuple[str, str]] = []

    cuda_archs = ""
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch's helper fails on an empty list when it cannot query a GPU.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPUs")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        include_dirs += _torch_bundled_cuda_includes(torch)
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3"]
        nvcc_flags += ["--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v", "-Xcompiler=-fvisibility=hidden"]
        define_macros.append(("MSDA_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "msda._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "msda._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    _write_build_info(torch, with_cuda, cuda_archs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


if any(arg in METADATA_ONLY for arg in sys.argv[1:]):
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = _extensions()

setup(version=_read_version(), ext_modules=ext_modules, cmdclass=cmdclass)
