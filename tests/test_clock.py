"""The measured core clock (msda._C.measure_clock_hz, csrc/cpu/clock.cpp),
which the benchmarks use for derived peaks and cycles per sample.

A chain the core can shorten reads as a clock no CPU has: a chain of
immediate adds read 12-16 GHz on a core that folds them while renaming. The
checks are one-sided, so a busy machine (which only makes a chain read slow)
cannot fail them: no x86-64 core runs at 7 GHz, and the add chain must not
read much faster than a chain of multiplies, whose 3-cycle latency no core
shortens.
"""

from __future__ import annotations

import platform

import pytest

from msda import _extension

EXT = _extension.EXTENSION  # msda._C, or None without the compiled library
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
FASTEST_X86_CLOCK_HZ = 7e9  # above every shipping x86-64 core's top turbo (about 6.2 GHz)


@pytest.mark.skipif(EXT is None, reason="needs msda's compiled library")
@pytest.mark.skipif(not IS_X86, reason="the multiply latency is known on x86-64 only")
def test_add_chain_clock_is_plausible_and_agrees_with_the_multiply_chain():
    add_hz = EXT.measure_clock_hz()
    multiply_hz = EXT.measure_clock_hz_multiply()
    assert 0 < add_hz < FASTEST_X86_CLOCK_HZ, add_hz
    assert 0 < multiply_hz < FASTEST_X86_CLOCK_HZ, multiply_hz
    # Load slows either chain, never speeds one up; a folded chain reads 3-4x too fast.
    assert add_hz < 1.5 * multiply_hz, (add_hz, multiply_hz)

