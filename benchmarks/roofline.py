"""How far the op is from the machine's limit: FLOP and byte counts, and the machine's peaks.

FLOP count (float32 multiply and add each count 1, per sample point and channel):

    forward       = 10 * N * Lq * M * L * P * D
                    (bilinear interpolation: 4 multiply-adds over the corners;
                     attention weight: 1 multiply-add into the output)
    forward+back  = 3 * forward = 30 * N * Lq * M * L * P * D
                    (backward counted as twice the forward, the convention for
                     matmul and convolution; the real backward does a little more)

Per-sample coordinate arithmetic (O(N*Lq*M*L*P), no factor D) is not counted.

Bytes (compulsory DRAM traffic in float32, each tensor read or written once):

    forward  = 4 * (V + 3*N*Lq*M*L*P [locations, weights] + N*Lq*M*D [output])
    backward = 4 * (V + N*S*M*D [grad_value, dense] + 6*N*Lq*M*L*P [loc, weights, their grads]
                    + N*Lq*M*D [grad_output])
    V = min(N*S*M*D, 4*N*Lq*M*L*P*D): the value rows the samples can touch (few
        decoder queries touch a small part of the maps)

and the gathered bytes, 4 * 4 * N*Lq*M*L*P*D (four corners of D channels per
sample), which the kernel loads from cache: the op is a gather, so its
practical limit is cache load bandwidth, not FLOPs.

Machine peaks, each said how it is obtained:

* FLOP/s, measured: a float32 matmul (2 n^3 FLOPs) with torch at the benchmark's threads;
* FLOP/s, derived: cores x clock x 2 FMA pipes x SIMD lanes (16 with AVX-512,
  8 with AVX2) x 2 FLOPs per FMA; the clock is measured (``msda._C.measure_clock_hz``:
  a chain of dependent adds, one per cycle), since ``cpu MHz`` in /proc/cpuinfo
  is the nominal clock, which in a virtual machine can be far below the real one;
* memory bandwidth, measured: a float32 tensor copy of 256 MiB (bytes read + written);
* cache load bandwidth, derived: cores x clock x 2 vector loads per cycle x vector width.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

FLOPS_PER_SAMPLE_CHANNEL_FORWARD = 10
BACKWARD_TO_FORWARD_FLOPS = 2
BYTES_PER_FLOAT = 4


def op_flops(dims: dict[str, int]) -> dict[str, float]:
    samples_channels = dims["N"] * dims["Lq"] * dims["M"] * dims["L"] * dims["P"] * dims["D"]
    forward = FLOPS_PER_SAMPLE_CHANNEL_FORWARD * samples_channels
    return {"forward": float(forward), "forward_backward": float(forward * (1 + BACKWARD_TO_FORWARD_FLOPS))}


def op_bytes(dims: dict[str, int]) -> dict[str, float]:
    N, S, Lq, M, D, L, P = (dims[k] for k in ("N", "S", "Lq", "M", "D", "L", "P"))
    value = N * S * M * D
    samples = N * Lq * M * L * P
    out = N * Lq * M * D
    value_read = min(value, 4 * samples * D)  # at most 4 corner rows of D channels per sample
    forward = BYTES_PER_FLOAT * (value_read + 3 * samples + out)
    backward = BYTES_PER_FLOAT * (value_read + value + 6 * samples + out)
    gathered = BYTES_PER_FLOAT * 4 * samples * D
    return {"forward": float(forward), "forward_backward": float(forward + backward), "gathered_forward": float(gathered)}


def _cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":")[1].split())
    except OSError:
        pass
    return set()


def _measured_clock_mhz() -> float | None:
    try:
        from msda import _C  # the compiled extension; absent in a fallback install

        hz = _C.measure_clock_hz()
    except (ImportError, AttributeError):
        return None
    return hz / 1e6 if hz > 0 else None


def derived_peaks(cores: int) -> dict[str, object]:
    """Peak FLOP/s and cache load bandwidth from clock and SIMD width (assumes 2 FMA and 2 load pipes)."""
    nominal = _cpu_mhz()
    measured = _measured_clock_mhz()
    mhz = measured or nominal
    flags = _cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma_pipes = 2 if "fma" in flags else 1
    if mhz is None:
        return {"available": False, "why": "no clock known"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if measured and load > 0.5 * (os.cpu_count() or 1):
        # Other work shared the core while the add chain ran: the clock reads low
        # (1234 MHz was seen on a 2-core VM under load), and every derived figure with it.
        return {"available": False, "why": f"load average {load:.1f} while the clock was measured"}
    hz = mhz * 1e6
    clock = f"{mhz:.0f} MHz ({'measured' if measured else 'nominal, from /proc/cpuinfo'})"
    return {
        "available": True,
        "clock_mhz": mhz,
        "clock_measured": measured is not None,
        "nominal_clock_mhz": nominal,
        "cores": cores,
        "fp32_lanes": lanes,
        "fma_pipes_assumed": fma_pipes,
        "gflops": cores * hz * fma_pipes * lanes * 2 / 1e9,
        "cache_load_gbps": cores * hz * 2 * lanes * BYTES_PER_FLOAT / 1e9,
        "how": f"{cores} cores x {clock} x {fma_pipes} FMA pipes x {lanes} fp32 lanes x 2; "
        f"loads: 2 x {lanes * BYTES_PER_FLOAT}-byte loads per cycle per core",
    }


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measured_peaks(threads: int, quick: bool = False) -> dict[str, object]:
    """Practical peaks with torch on the CPU: matmul GFLOP/s and copy GB/s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 512 if quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        t_mm = _median_time(lambda: torch.matmul(a, b, out=c), 3 if quick else 7)
        elements = (4 if quick else 64) * 2**20  # 16 MiB / 256 MiB of float32: past the L3 cache
        src, dst = torch.randn(elements), torch.empty(elements)
        t_copy = _median_time(lambda: dst.copy_(src), 3 if quick else 7)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "matmul_n": n,
        "gflops": 2 * n**3 / t_mm / 1e9,
        "copy_bytes": 2 * elements * BYTES_PER_FLOAT,
        "copy_gbps": 2 * elements * BYTES_PER_FLOAT / t_copy / 1e9,
        "how": f"float32 matmul {n}x{n}x{n} (2n^3 FLOPs) and a {elements * 4 >> 20} MiB tensor copy "
        f"(read + write), torch at {threads} threads, median of repeats",
    }


def machine_peaks(threads: int, quick: bool = False) -> dict[str, object]:
    cores = min(threads, os.cpu_count() or threads)
    if quick:  # a smoke run derives nothing
        return {"measured": measured_peaks(threads, quick), "derived": {"available": False, "why": "--quick"}}
    return {"measured": measured_peaks(threads, quick), "derived": derived_peaks(cores)}


def roofline_row(dims: dict[str, int], forward_s: float, forward_backward_s: float,
                 peaks: dict[str, object]) -> dict[str, float]:
    """Achieved rates of one kernel measurement and their fractions of the machine's peaks."""
    flops, nbytes = op_flops(dims), op_bytes(dims)
    measured = peaks["measured"]
    derived = peaks["derived"]
    row = {
        "gflops_forward": flops["forward"] / forward_s / 1e9,
        "gflops_forward_backward": flops["forward_backward"] / forward_backward_s / 1e9,
        "dram_gbps_forward": nbytes["forward"] / forward_s / 1e9,
        "dram_gbps_forward_backward": nbytes["forward_backward"] / forward_backward_s / 1e9,
        "gathered_gbps_forward": nbytes["gathered_forward"] / forward_s / 1e9,
    }
    row["fraction_of_matmul_peak_forward"] = row["gflops_forward"] / measured["gflops"]
    row["fraction_of_copy_bandwidth_forward"] = row["dram_gbps_forward"] / measured["copy_gbps"]
    if derived.get("available"):
        row["fraction_of_derived_peak_forward"] = row["gflops_forward"] / derived["gflops"]
        row["fraction_of_cache_load_bandwidth_forward"] = row["gathered_gbps_forward"] / derived["cache_load_gbps"]
        # Core cycles per sample, and per 64-byte line of corner rows it touches
        # (forward: 4 corner rows of value; backward: those again and the same
        # rows of grad_value): the op's real cost unit, since each sample's lines
        # rarely coincide with the previous samples'.
        samples = dims["N"] * dims["Lq"] * dims["M"] * dims["L"] * dims["P"]
        cycles = derived["cores"] * derived["clock_mhz"] * 1e6 / max(samples, 1)
        lines = 4 * -(-dims["D"] * BYTES_PER_FLOAT // 64)
        row["cycles_per_sample_forward"] = forward_s * cycles
        row["cycles_per_sample_backward"] = (forward_backward_s - forward_s) * cycles
        row["cycles_per_line_forward"] = row["cycles_per_sample_forward"] / lines
        row["cycles_per_line_backward"] = row["cycles_per_sample_backward"] / (2 * lines)
    return row
