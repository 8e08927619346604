// CPUID/XGETBV feature detection and the kernel-path lookup (see cpu_features.hpp).
//
// Both the instruction bits (CPUID) and the OS's saving of the wider register state
// (XGETBV) are checked: a CPU with AVX-512 under an OS that does not save ZMM registers
// must fall back to AVX2.
#include "cpu_features.hpp"

#include <cpuid.h>

#include <cstdint>
#include <stdexcept>

namespace kt {
namespace {

struct Features {
    bool avx2 = false;
    bool avx512 = false;  // F + BW + VL + DQ + VNNI + BF16, with OS support
};

uint64_t xgetbv0() {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
}

Features detect() {
    Features f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
    if (!(osxsave && avx)) return f;
    const uint64_t xcr0 = xgetbv0();
    const bool ymm_state = (xcr0 & 0x6) == 0x6;
    const bool zmm_state = (xcr0 & 0xe6) == 0xe6;
    if (__get_cpuid_max(0, nullptr) < 7) return f;
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx2 = b & (1u << 5);
    const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
    const bool vnni = c & (1u << 11);
    const unsigned max_sub = a;
    bool bf16 = false;
    if (max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        bf16 = a & (1u << 5);
    }
    f.avx2 = ymm_state && avx2 && fma && f16c;
    f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && vnni && bf16;
    return f;
}

const Features& features() {
    static const Features f = detect();
    return f;
}

}  // namespace

std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    if (features().avx512) out.push_back("avx512");
    if (features().avx2) out.push_back("avx2");
    return out;
}

const KernelTable& kernels_for(const std::string& isa) {
    const Features& f = features();
    if (isa == "auto") {
        if (f.avx512) return kernels_avx512();
        if (f.avx2) return kernels_avx2();
        throw std::runtime_error("the CPU engine needs at least AVX2 with FMA and F16C, which this CPU lacks");
    }
    if (isa == "avx512") {
        if (!f.avx512)
            throw std::runtime_error("ISA 'avx512' (AVX-512 F/BW/VL/DQ with VNNI and BF16) is not supported by this CPU");
        return kernels_avx512();
    }
    if (isa == "avx2") {
        if (!f.avx2) throw std::runtime_error("ISA 'avx2' (AVX2 with FMA and F16C) is not supported by this CPU");
        return kernels_avx2();
    }
    throw std::invalid_argument("unknown ISA '" + isa + "'; expected 'auto', 'avx2' or 'avx512'");
}

}  // namespace kt
