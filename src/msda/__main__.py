"""``python -m msda info``: what was built and what is running."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import __version__, _extension


def info() -> str:
    build = _extension.BUILD_INFO
    lines = [
        f"msda {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (running)",
        f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}",
    ]
    if build is None:
        lines.append("extension: not built")
    else:
        lines += [
            f"extension built for torch {build.TORCH_VERSION}",
            f"compiler: {build.COMPILER}",
            f"CUDA kernels: {'yes, archs ' + build.CUDA_ARCHS if build.WITH_CUDA else 'no'}",
        ]
    if _extension.AVAILABLE:
        lines.append(f"extension: loaded; kernels for {', '.join(sorted(_extension.KERNEL_DEVICES)) or 'no device'}")
        ext = _extension.EXTENSION
        flags = getattr(build, "CPU_FLAGS", "") or "none"
        lines += [
            f"CPU kernels compiled for: {', '.join(ext.cpu_capabilities_compiled())} (extra compiler flags: {flags})",
            f"CPU kernels this CPU allows: {', '.join(ext.cpu_capabilities_allowed())}",
            f"CPU kernels in use: {ext.cpu_capability()} "
            f"({_extension.CPU_CAPABILITY_ENV}={os.environ.get(_extension.CPU_CAPABILITY_ENV, '') or 'unset'})",
        ]
        if ext.cpu_capability_refusal():
            lines.append(f"  refused: {ext.cpu_capability_refusal()}")
        limit_mib = ext.cpu_cache_stats()[2] / 2**20
        lines.append(f"CPU output cache: up to {limit_mib:g} MiB idle "
                     f"(MSDA_CPU_CACHE_MB={os.environ.get('MSDA_CPU_CACHE_MB', '') or 'unset'})")
    else:
        lines.append(f"extension: NOT loaded: {_extension.UNAVAILABLE_REASON} (ops use the reference)")
    lines.append(f"torch CUDA: {torch.version.cuda or 'none'}, GPU available: {torch.cuda.is_available()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msda", description=__doc__)
    parser.add_argument("command", choices=["info"], help="info: print what is built")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
