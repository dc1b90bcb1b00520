// Measures the core clock (Hz) with a dependent add chain; 0 where the
// architecture has no measurement. Exposed as msda._C.measure_clock_hz().
#pragma once

namespace msda::cpu {
double measure_clock_hz();
}
