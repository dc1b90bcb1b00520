"""Peak extra memory of one call, measured from outside the allocator.

On the CPU the resident-set size is what the machine actually pays, whatever
allocator (glibc, torch's caching) sits in between. Its peak (VmHWM) only ever
grows during a process's life, so each (case, implementation) pair is
measured in a fresh process, and Linux is asked to reset the peak
(``/proc/self/clear_refs``, value 5) right after the inputs are built, so
building them does not count. (``ru_maxrss`` is not used: on Linux it is at
least the parent's RSS at fork.) Where the reset is not
allowed, the peak since process start is used, which can only overstate.
File-backed pages (library code faulted in for the first time, or again
after the kernel reclaimed it on a busy machine) that appear during the call
are subtracted: they are not memory the op allocates.

Before the baseline is read, glibc is asked to return its free heap memory
to the system (``malloc_trim(0)``): building the inputs leaves freed
temporaries (a float32 tensor converted to bfloat16, the pieces of the
locations) resident in the heap, and a call that reuses them would not raise
the RSS at all, so the figure would depend on how the inputs were built
rather than on what the call allocates (measured: msda's bfloat16
forward+backward on the encoder shape showed 4 MiB without the trim, less
than the 38 MiB of output and gradients it returns). msda's own cache of
large CPU outputs (msda.cpu_cache) is emptied first for the same reason.

On CUDA the caching allocator's own peak statistics are used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from typing import Callable

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Make the resident-set peak equal the current RSS; False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): free heap memory back to the system; False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def release_msda_cache() -> None:
    """Free the idle blocks of msda's CPU output cache (msda.cpu_cache), for
    the same reason as the heap: a call that reused them would not show the
    memory it takes."""
    try:
        import msda.cpu_cache

        msda.cpu_cache.release()
    except (ImportError, RuntimeError):  # no extension: no cache
        pass


def peak_rss_bytes() -> int:
    """This process's resident-set peak (VmHWM).

    Not ``ru_maxrss``: that is also at least the RSS of the parent at fork
    (Linux keeps the pre-exec peak), so a large parent such as run_all.py
    would raise the floor of every worker's figure.
    """
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> dict[str, object]:
    """Peak memory above what is in use before ``fn`` runs once.

    Call this before anything else runs ``fn``, so the result includes every
    allocation the call makes (nothing reused from an earlier call's caches).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_extra_bytes": peak - baseline, "method": "torch.cuda.max_memory_allocated - baseline"}
    release_msda_cache()
    trimmed = release_free_heap()
    file_before = _status_kib("RssFile") * 1024
    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    fn()
    peak = peak_rss_bytes()
    file_growth = max(_status_kib("RssFile") * 1024 - file_before, 0)
    method = "VmHWM (reset via clear_refs) - RSS before the call - file-backed RSS growth"
    if not reset_ok:
        method = method.replace("reset via clear_refs", "since process start, could not reset")
    method += "; free heap returned with malloc_trim(0) first" if trimmed else "; no malloc_trim (not glibc)"
    return {
        "peak_extra_bytes": max(peak - baseline - file_growth, 0),
        "raw_peak_extra_bytes": max(peak - baseline, 0),
        "file_backed_growth_bytes": file_growth,
        "baseline_rss_bytes": baseline,
        "method": method,
    }
