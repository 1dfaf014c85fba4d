// The CPU kernels (kernels.h) for the compiler's default target: what every CPU runs (cpu_variants.h).
#include "cpu_variants.h"

#define THREEG_CPU_VARIANT cpu_baseline
#define THREEG_VECTOR_BYTES 16
#include "kernels.h"
