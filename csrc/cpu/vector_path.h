// Which vector instructions the CPU kernels were compiled for ("AVX-512",
// "AVX2" or "portable"), decided by the compiler flags (setup.py's
// MSDA_CPU_FLAGS); reported by `python -m msda info` and checked in CI.
#pragma once

namespace msda::cpu {
const char* vector_path();
}
