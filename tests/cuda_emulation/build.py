"""Build (or reuse) the CUDA emulation harness as a Python module.

The harness compiles the CUDA kernels' device code and host launch code
(csrc/cuda) as host C++ together with tests/cuda_emulation/cuda_emulation.h,
with torch.utils.cpp_extension.load. The build directory is under
$MSDA_CACHE_DIR (default ~/.cache/msda), so ninja reuses it across runs.
$MSDA_EMULATION_CSRC points the build at another copy of csrc (the bug
injection script uses it); each csrc gets its own build directory.
MSDA_EMULATION_BUILD=ubsan-fma builds the modules with UndefinedBehaviorSanitizer
(any report aborts the process) and with floating-point contraction into
fused multiply-adds allowed (-ffp-contract=fast -mfma), as nvcc contracts by
default: .ci/cuda_emulation_ubsan_fma.sh runs the emulation tests so.
"""

from __future__ import annotations

import hashlib
import os
import struct
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


# UBSan with every check fatal, plus float-to-integer conversions out of range
# (not part of GCC's -fsanitize=undefined); vptr off: torch's and pybind11's
# types cross shared libraries. Contraction as nvcc does it (an FMA wherever
# a product feeds an addition; GCC forms FMAs from -O2 on), so the host build
# takes the freedom the GPU build has.
UBSAN_FMA_FLAGS = ["-fsanitize=undefined,float-cast-overflow", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
                   "-ffp-contract=fast", "-mfma", "-O2", "-DMSDA_EMU_UBSAN_FMA"]


def cache_dir() -> str:
    return os.environ.get("MSDA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "msda")


def load_emulation(
    csrc: str | None = None, verbose: bool = False, entry: str = "emulated_ops.cpp", tsan: bool = False
) -> ModuleType:
    """Compile (if needed) and import the emulation module for `csrc`.

    entry: the op's entry file (emulated_ops_v2.cpp: the v2 op of issue 13).
    tsan: build it with ThreadSanitizer and race detection (race_detection.h);
    such a module loads only in a process that started with libtsan preloaded
    (tsan_check.py does that)."""
    from torch.utils import cpp_extension

    csrc = os.path.abspath(csrc or os.environ.get("MSDA_EMULATION_CSRC") or os.path.join(REPO_ROOT, "csrc"))
    tag = hashlib.sha1(csrc.encode()).hexdigest()[:10]
    name = f"msda_cuda_emulation_{tag}"
    if entry != "emulated_ops.cpp":
        name += "_" + os.path.splitext(entry)[0]
    name += "_tsan" if tsan else ""
    flavour = os.environ.get("MSDA_EMULATION_BUILD", "")
    if flavour not in ("", "ubsan-fma"):
        raise ValueError(f"MSDA_EMULATION_BUILD must be empty or 'ubsan-fma', got {flavour!r}")
    name += "_ubsan_fma" if flavour else ""
    build_dir = os.path.join(cache_dir(), "cuda_emulation", name)
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    module = cpp_extension.load(
        name=name,
        sources=[os.path.join(HERE, entry)],
        extra_include_paths=[csrc, HERE],
        # -O1 keeps the build short; the emulation's speed is in its fibers.
        # -fno-gnu-unique: the emulator's state (msda_emu::g, the shared-memory
        # layout, the device copies) are inline variables, which GCC makes
        # process-wide unique symbols; the v1 and v2 modules loaded in one
        # process would then share one state, and the second's shared-memory
        # layout would replace the first's.
        extra_cflags=["-O1", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas",  # "#pragma unroll"
                      "-fno-gnu-unique"]
        + (["-fsanitize=thread", "-DMSDA_EMU_TSAN"] if tsan else [])
        + (UBSAN_FMA_FLAGS if flavour else []),
        extra_ldflags=(["-fsanitize=thread"] if tsan else []) + (["-fsanitize=undefined"] if flavour else []),
        build_directory=build_dir,
        verbose=verbose,
    )
    module.set_shared_layout(shared_arrays(module.__file__))
    return module


# Mangled names of static locals in functions of msda::cuda_kernels: in device
# code the only such statics are __shared__ arrays.
SHARED_PREFIX = b"_ZZN4msda12cuda_kernels"
RED_ZONE = b"msda_emu_red_zone_"


def shared_arrays(path: str) -> list[tuple[int, int, int, str]]:
    """(address, bytes, red zone bytes, symbol) of every __shared__ array of the
    kernels, read from the ELF64 symbol table of the built module: the red zone
    is the padding and the 4 KiB red-zone static (cuda_emulation.h's __shared__)
    that follow it. For the emulator's red-zone checks (memory_checks.h)."""
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise RuntimeError(f"{path}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    symtab = next(sh for sh in sections if sh[1] == 2)  # SHT_SYMTAB
    strtab = sections[symtab[6]]
    objects, arrays = [], set()
    for off in range(symtab[4], symtab[4] + symtab[5], symtab[9]):
        name, info, _, shndx, value, size = struct.unpack_from("<IBBHQQ", elf, off)
        if info & 0xF != 1 or size == 0:  # STT_OBJECT
            continue
        symbol = elf[strtab[4] + name:elf.index(b"\0", strtab[4] + name)]
        if not (symbol.startswith(SHARED_PREFIX) and RED_ZONE in symbol):
            objects.append(value)
            if symbol.startswith(SHARED_PREFIX):
                arrays.add((value, size, symbol.decode()))
    layout = []
    for value, size, symbol in sorted(arrays):
        # Up to the next object that is not a red zone: only red zones and
        # alignment padding lie in between (at most 16 KiB are checked).
        end = value + size
        layout.append((value, size, min([o for o in objects if o >= end] + [end + 16384]) - end, symbol))
    return layout
