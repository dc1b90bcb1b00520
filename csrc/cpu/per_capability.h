// Included by every header whose code is compiled once per CPU capability
// (dispatch.h explains the mechanism): such code lives in
// `namespace msda::cpu { inline namespace CPU_CAPABILITY {` and may only be
// included from sources under csrc/cpu/capability/.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "compiled once per CPU capability: include this header only from csrc/cpu/capability/ (setup.py defines CPU_CAPABILITY there)"
#endif
