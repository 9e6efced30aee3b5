// Stands in for CUDA's cuda_runtime.h when csrc/cuda/*.cu is compiled for the host emulator (cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
