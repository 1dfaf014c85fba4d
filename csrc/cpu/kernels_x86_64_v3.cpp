// The CPU kernels (kernels.h) for x86-64-v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE), picked at run time on a CPU
// that has them (cpu_variants.h). The headers come first, outside the target: only kernels.h's own code is
// compiled for this instruction set.
#include "cpu_variants.h"
#if THREEG_X86_VARIANTS
#include "kernels_deps.h"

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define THREEG_CPU_VARIANT cpu_x86_64_v3
#define THREEG_VECTOR_BYTES 32
#include "kernels.h"
#pragma GCC pop_options
#endif
