// The AVX-512 path (F, BW, VL, DQ, VNNI, BF16), compiled with those flags and selected at
// run time only on CPUs that report all of them (see cpu_features.cpp).
//
// Integer block kernels use VNNI's vpdpbusd on 512-bit registers; BF16 weights use
// vdpbf16ps with bfloat16 activations. Everything is static inside kt::isa_avx512, reached
// only through kernels_avx512().
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_table.hpp"

namespace kt {
namespace isa_avx512 {

#define KT_ISA_NAME "avx512"
#include "kernels_common.inc"
#include "kernels_dtype.inc"
#include "kernels_norm.inc"
#include "simd_avx512.inc"
#include "kernels_quant.inc"
#include "kernels_kquant_avx512.inc"
#include "kernels_q8_0_avx512.inc"
#include "kernels_float_avx512.inc"
#include "kernels_attention.inc"
#include "kernels_driver.inc"
#undef KT_ISA_NAME

}  // namespace isa_avx512

const KernelTable& kernels_avx512() { return isa_avx512::kTable; }

}  // namespace kt
