// MSDA_LAUNCH for the real CUDA build: launch on the given stream and raise
// the launch error as an exception. The launch code (ms_deform_attn_launch.h,
// v2_launch.h) is written against this macro so that the CPU-side CUDA
// emulation (tests/cuda_emulation/) can define it its own way.
#pragma once

#include <c10/cuda/CUDAException.h>

#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)    \
  do {                                                                 \
    kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                    \
  } while (0)
