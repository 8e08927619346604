// A linear layer y = x W^T (+ b) on a stored (possibly quantized) weight.
//
// The same kernels as the experts, for the dense projections a rule sends to the CPU
// engine (lm_head, shared experts, dense MLPs). It runs synchronously on the pool: the
// input rows are quantized in one phase, then row blocks of W are tasks, each doing all
// tokens. Like MoELayer, each op owns its scratch.
#pragma once

#include <memory>
#include <vector>

#include "aligned_buffer.hpp"
#include "engine_types.hpp"
#include "kernel_table.hpp"
#include "thread_pool.hpp"

namespace kt {

class LinearOp {
public:
    LinearOp(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, const MatrixView& weight);

    // out[T, rows] = x[T, cols] W^T (+ bias[rows] when not null); all float32, contiguous.
    void forward(const float* x, int tokens, float* out, const float* bias);
    const char* isa() const { return k_.isa; }

private:
    std::shared_ptr<ThreadPool> pool_;
    const KernelTable& k_;
    MatrixView w_;
    ActKind act_;
    size_t act_row_;
    AlignedBuffer xq_;
    std::vector<const uint8_t*> rows_;
};

}  // namespace kt
