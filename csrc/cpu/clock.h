// Measures the core clock (Hz) with a dependent register-add chain; 0 where
// the architecture has no measurement. Exposed as msda_measure_clock_hz()
// (Python: msda._C.measure_clock_hz()). The multiply chain is the
// independent cross-check (x86-64 only, else 0): msda_measure_clock_hz_multiply().
#pragma once

namespace msda::cpu {
double measure_clock_hz();
double measure_clock_hz_multiply();
}
