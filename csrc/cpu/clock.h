// Measures the core clock (Hz) with a dependent add chain; 0 where the
// architecture has no measurement. Exposed as msda_measure_clock_hz() (Python: msda._C.measure_clock_hz()).
#pragma once

namespace msda::cpu {
double measure_clock_hz();
}
