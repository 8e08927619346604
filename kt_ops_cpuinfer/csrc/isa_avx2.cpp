// The AVX2 baseline path (AVX2 + FMA + F16C), compiled with exactly those flags.
//
// Every kernel lives in namespace kt::isa_avx2 and is static, so nothing here can be
// confused by the linker with its AVX-512 twin; the engine reaches it only through
// kernels_avx2(). The .inc files are shared with isa_avx512.cpp: what differs between the
// paths is the SIMD vocabulary (simd_*.inc) and the float kernels (kernels_float_*.inc).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_table.hpp"

namespace kt {
namespace isa_avx2 {

#define KT_ISA_NAME "avx2"
#include "kernels_common.inc"
#include "kernels_dtype.inc"
#include "kernels_norm.inc"
#include "simd_avx2.inc"
#include "kernels_quant.inc"
#include "kernels_kquant_avx2.inc"
#include "kernels_q8_0_avx2.inc"
#include "kernels_float_avx2.inc"
#include "kernels_attention.inc"
#include "kernels_driver.inc"
#undef KT_ISA_NAME

}  // namespace isa_avx2

const KernelTable& kernels_avx2() { return isa_avx2::kTable; }

}  // namespace kt
