"""Build script for msda's compiled library ``msda/libmsda.so``.

The library holds the ops (schemas, CPU and CUDA kernels, the runtime CPU
dispatch) and no Python: it is built with ``py_limited_api=True``, which keeps
torch's helpers from linking libtorch_python, and has no Python C API in it,
so a C++ program (an AOTInductor package's runner) loads the same file as
Python, which loads it through ``msda/_C.py``.

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
* ``MSDA_CPU_CAPABILITIES``: which CPU kernel variants to compile, comma
  separated, default all of this architecture's (x86-64: ``avx512,avx2,default``;
  others: ``default``). ``default`` is always compiled. The library picks the
  best one the CPU supports when it loads (csrc/cpu/dispatch.h).
* ``MSDA_CPU_FLAGS``: for experts, extra compiler flags appended to every C++
  source (sanitizers, ``-g``, ``-mtune=...``), default none. They apply to the
  common code and to every capability's kernels alike, so a ``-march=`` flag
  here makes every path use that machine's instructions: such a build runs
  only on CPUs like the build machine (what ``-march=native``, the default
  before runtime dispatch, did).
* ``MSDA_DEBUG=1``: -O0 -g builds.
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc 13 supports sm_75 .. sm_121; PTX of the newest lets future GPUs JIT it.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"

# Commands that only describe the sources need neither torch nor a compiler.
# dist_info is not one of them: pip runs it to prepare a wheel's metadata,
# which names the torch the wheel is built for; failing there (no torch in
# the build environment) stops `pip install .` before pip downloads a torch.
METADATA_ONLY = {"sdist", "egg_info", "--version", "--name", "check", "clean"}


# pyproject.toml's `license = "Apache-2.0"` and `license-files` need setuptools 77 (PEP 639);
# older ones reject them with a schema error about `project.license` that does not say so.
MIN_SETUPTOOLS = 77


def _check_setuptools(version: str) -> None:
    """Stop with msda's own message under a setuptools older than MIN_SETUPTOOLS. Runs before
    setup(), which is where setuptools validates pyproject.toml."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return  # an unusual version string: let setuptools itself decide
    if major < MIN_SETUPTOOLS:
        sys.stderr.write(
            f"\nmsda: building needs setuptools>={MIN_SETUPTOOLS}; this environment has setuptools {version}\n"
            "(with --no-build-isolation, pip uses the setuptools installed here). Upgrade it, then build again:\n\n"
            f'    pip install "setuptools>={MIN_SETUPTOOLS}"\n'
            "    pip install --no-build-isolation .\n\n"
        )
        raise SystemExit(1)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _read_version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "src", "msda", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _torch_series(torch) -> str:
    """'2.13' for torch 2.13.0+cpu: the release series a build is bound to."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"{major}.{minor}"


def _built_for(torch, with_cuda: bool) -> tuple[str, list[str]]:
    """The version and requirements of a build: the local version names the
    torch series and msda's kernels (cpu, or the CUDA version, e.g. cu130),
    and the wheel requires that torch series, the only one its binary loads with."""
    series = _torch_series(torch)
    variant = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    return f"{_read_version()}+torch{series}{variant}", [f"torch=={series}.*", "numpy"]


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


# Runtime CPU dispatch (csrc/cpu/dispatch.h explains the C++ side). Every
# source under csrc/cpu/capability/ is compiled once per CPU capability, with
# that capability's flags and -DCPU_CAPABILITY=<NAME> -DCPU_CAPABILITY_<NAME>
# (the names ATen's vector headers key on); all other sources are compiled
# once, with the compiler's baseline (x86-64, or armv8-a with NEON). A new
# kernel joins by putting its per-capability source in that folder and
# registering with MSDA_REGISTER_CPU_KERNEL. The objects are linked lowest
# capability first: of the inline functions from other libraries' headers
# that several variants instantiate, the linker keeps the first copy, so the
# copy the lower paths call is never one compiled with AVX-512.
LIBRARY_NAME = "msda.libmsda"
CAPABILITY_SOURCES = sorted(glob.glob("csrc/cpu/capability/*.cpp"))
X86_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    # The set torch's AVX512 kernels use (F, BW, VL, DQ), plus FMA and F16C
    # (which AVX-512F does not imply in GCC's options).
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _cpu_capabilities() -> list[str]:
    """The capabilities to compile, lowest first (the link order)."""
    machine = platform.machine().lower()
    available = list(X86_CAPABILITY_FLAGS) if machine in ("x86_64", "amd64") else ["DEFAULT"]
    asked = os.environ.get("MSDA_CPU_CAPABILITIES", "")
    if not asked.strip():
        return available
    wanted = {name.strip().upper() for name in asked.split(",") if name.strip()} | {"DEFAULT"}
    unknown = wanted - set(available)
    if unknown:
        sys.stderr.write(
            f"msda: MSDA_CPU_CAPABILITIES names {', '.join(sorted(n.lower() for n in unknown))}, "
            f"not available on {machine}; choose from {', '.join(n.lower() for n in available)}\n"
        )
        raise SystemExit(1)
    return [name for name in available if name in wanted]


def _capability_build_ext(base, capabilities: list[str]):
    class CapabilityBuildExt(base):
        """Compiles CAPABILITY_SOURCES once per capability into their own
        build folders and links the objects after the common ones."""

        def get_ext_filename(self, fullname: str) -> str:
            # A plain shared library, not a Python module: no ABI tag in its name.
            # setuptools asks with the full name and with its last part only.
            filename = super().get_ext_filename(fullname)
            if fullname.split(".")[-1] == LIBRARY_NAME.split(".")[-1]:
                return os.path.join(os.path.dirname(filename), "libmsda.so")
            return filename

        def build_extension(self, ext):
            def compile_variant(name: str) -> list[str]:
                post = dict(ext.extra_compile_args)
                post["cxx"] = list(post["cxx"]) + X86_CAPABILITY_FLAGS.get(name, [])
                return self.compiler.compile(
                    CAPABILITY_SOURCES,
                    output_dir=os.path.join(self.build_temp, "capability", name.lower()),
                    macros=list(ext.define_macros) + [("CPU_CAPABILITY", name), (f"CPU_CAPABILITY_{name}", None)],
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=post,
                    depends=ext.depends,
                )

            # One ninja run per variant (each has its own flags and folder),
            # side by side up to MAX_JOBS; the objects keep the lowest-first order.
            jobs = max(1, min(len(capabilities), int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)))
            with ThreadPoolExecutor(jobs) as pool:
                ext.extra_objects = [obj for objs in pool.map(compile_variant, capabilities) for obj in objs]
            super().build_extension(ext)

    return CapabilityBuildExt


def _write_build_info(torch, with_cuda: bool, cuda_archs: str, capabilities: list[str]) -> None:
    path = os.path.join(ROOT, "src", "msda", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; compared with the running torch before loading _C.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"COMPILER = {_compiler_description()!r}\n")
        f.write(f"CPU_FLAGS = {os.environ.get('MSDA_CPU_FLAGS', '')!r}\n")
        f.write(f"CPU_CAPABILITIES = {capabilities!r}\n")
        f.write(f"DEBUG = {_env_flag('MSDA_DEBUG')!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {cuda_archs!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n")


def _extensions():
    torch, cpp_extension = _import_torch()
    debug = _env_flag("MSDA_DEBUG")
    with_cuda, why = _want_cuda(torch, cpp_extension)
    print(f"msda: building against torch {torch.__version__}; CUDA: {why}")

    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is inlined into our code: it needs OpenMP to use threads.
    cxx_flags += ["-fopenmp", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    # torch's vector headers make GCC report `#pragma unroll` (meant for other
    # compilers) and a false "may be used uninitialized" inside GCC's own
    # AVX-512 intrinsics; neither is in msda's code.
    cxx_flags += ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    cxx_flags += shlex.split(os.environ.get("MSDA_CPU_FLAGS", ""))
    capabilities = _cpu_capabilities()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link_args = ["-fopenmp"]
    # Wheels ship without debug info (Python's own CFLAGS add -g); debug and
    # sanitizer builds (-g in MSDA_CPU_FLAGS) keep it.
    if not debug and "-g" not in cxx_flags:
        extra_link_args.append("-Wl,--strip-debug")
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
            LIBRARY_NAME,
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            LIBRARY_NAME,
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    # setuptools relinks only when a source or one of these is newer than the library.
    ext.depends = CAPABILITY_SOURCES + sorted(glob.glob("csrc/**/*.h", recursive=True))
    # Before the library, msda._C was a Python extension module; a stale one
    # left by an earlier build (in place, or in build/lib*, which pip copies
    # from) would shadow msda/_C.py.
    for folder in [os.path.join(ROOT, "src", "msda")] + glob.glob(os.path.join(ROOT, "build", "lib*", "msda")):
        for stale in glob.glob(os.path.join(folder, "_C.*.so")):
            os.remove(stale)
    _write_build_info(torch, with_cuda, cuda_archs, [name.lower() for name in capabilities])
    build_ext = _capability_build_ext(cpp_extension.BuildExtension, capabilities).with_options(use_ninja=True)
    version, requires = _built_for(torch, with_cuda)
    return version, requires, [ext], {"build_ext": build_ext}


_check_setuptools(setuptools.__version__)
if any(arg in METADATA_ONLY for arg in sys.argv[1:]):
    # The sources, not a build: plain version, any torch.
    version, install_requires, ext_modules, cmdclass = _read_version(), ["torch", "numpy"], [], {}
else:
    version, install_requires, ext_modules, cmdclass = _extensions()

setup(version=version, install_requires=install_requires, ext_modules=ext_modules, cmdclass=cmdclass)
