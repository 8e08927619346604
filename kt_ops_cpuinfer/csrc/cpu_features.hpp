// Which kernel path this CPU can run, found with CPUID at run time.
//
// The extension is built once for generic x86-64; the choice between the AVX2 baseline and
// the AVX-512 (VNNI/BF16) kernels is made here, per process, so one build serves every
// machine. A path can be forced by name (the Python side maps KT_CPUINFER_ISA and
// set_isa() onto this) to test the baseline on an AVX-512 machine.
#pragma once

#include <string>
#include <vector>

#include "kernel_table.hpp"

namespace kt {

// ISA names this CPU (and its OS, for register state) supports, best first.
std::vector<std::string> supported_isas();

// The kernels for `isa` ("auto" picks the best supported). Throws std::invalid_argument
// for an unknown name and std::runtime_error for a path this CPU cannot run.
const KernelTable& kernels_for(const std::string& isa);

}  // namespace kt
