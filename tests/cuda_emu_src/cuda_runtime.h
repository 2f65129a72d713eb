// Stand-in for <cuda_runtime.h> in the CPU emulation of the CUDA kernels (tests/cuda_emu.py).
#pragma once
#include "vidgen_cuda_emu.h"
