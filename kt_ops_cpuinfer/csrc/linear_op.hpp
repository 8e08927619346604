// A linear layer y = x W^T (+ b) on a stored (possibly quantized) weight, or G of them
// side by side ("per-head" products: y[t, g] = W_g x[t, g]).
//
// The same kernels as the experts, for the dense projections a rule sends to the CPU
// engine (lm_head, shared experts, dense MLPs) and for MLA's absorbed per-head products,
// whose sixteen-odd small matrices are one task list here instead of sixteen calls. It
// runs synchronously on the pool: the input rows are quantized in one phase, then row
// blocks of each group's W are tasks, each doing all tokens. Its working buffers are
// borrowed from the pool's scratch for the call.
#pragma once

#include <memory>
#include <vector>

#include "scratch_pool.hpp"
#include "engine_types.hpp"
#include "kernel_table.hpp"
#include "thread_pool.hpp"

namespace kt {

class LinearOp {
public:
    // Group g's weight is `weight`'s "expert" g (rows from weight.row(g, r)).
    LinearOp(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, const MatrixView& weight, int groups = 1);

    // out[T, groups * rows] = per group g: x[T, g-th cols slice] W_g^T (+ bias[rows] when not
    // null, only for one group); contiguous. x and out are F32, F16 or BF16 (the model's
    // dtype, read and written here instead of by two torch casts around the call), bias F32.
    void forward(const void* x, WType x_type, int tokens, void* out, WType out_type, const float* bias);
    // The same computation as two phases (quantize the inputs, then the row blocks) appended
    // to `phases`, for a job that chains it with other ops (AbsorbedMLA). x, out and bias
    // must stay valid, and this op in no other job, until that job is done; then the job's
    // owner calls release_scratch().
    void append_phases(std::vector<Phase>& phases, const void* x, WType x_type, int tokens, void* out, WType out_type,
                       const float* bias);
    // Give the buffers of the last append_phases back to the pool.
    void release_scratch() { scratch_.release(); }
    const char* isa() const { return k_.isa; }
    int groups() const { return groups_; }
    int rows() const { return w_.rows; }  // outputs of one group
    int cols() const { return w_.cols; }  // inputs of one group

private:
    std::shared_ptr<ThreadPool> pool_;
    const KernelTable& k_;
    MatrixView w_;
    int groups_;
    ActKind act_;
    size_t act_row_;
    // Slots: kQuantized input rows, kWidened (16-bit inputs as float32), kResults (float32
    // results before they are rounded to a 16-bit output).
    enum Slot { kQuantized, kWidened, kResults, kSlots };
    ScratchLease scratch_;
    std::vector<const uint8_t*> rows_;
};

}  // namespace kt
