// One MoE layer's routed experts, computed on the stored (quantized) expert weights.
//
// For a batch of tokens with their top-k expert ids and weights, the layer groups the
// (token, expert) pairs by expert once, then runs one pool job of five phases:
//   1. quantize each token's hidden state into the activation format of gate/up;
//   2. gate and up projections fused: per (expert, block of intermediate rows) task, both
//      projections for all of the expert's tokens, then act(gate) * up;
//   3. quantize each pair's intermediate row into the down projection's format;
//   4. down projection per (expert, block of hidden rows) task;
//   5. weighted sum of each token's expert outputs (masked slots, id < 0 or >= E, skipped).
// Tiling over experts x rows keeps both decode (one token, ~6 experts: many row blocks per
// expert) and prefill (many tokens per expert) spread over all threads. The working
// buffers are borrowed from the pool's scratch from submit() to sync(), so layers queued
// on one pool never share them, and a layer holds none between calls.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "scratch_pool.hpp"
#include "engine_types.hpp"
#include "kernel_table.hpp"
#include "thread_pool.hpp"

namespace kt {

class MoELayer {
public:
    MoELayer(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, int experts, int hidden, int intermediate,
             const MatrixView& gate, const MatrixView& up, const MatrixView& down, ActFn act);
    ~MoELayer();
    MoELayer(const MoELayer&) = delete;
    MoELayer& operator=(const MoELayer&) = delete;

    // Start computing out[T, H] from x[T, H], ids[T, K] (int64) and weights[T, K] (float32);
    // returns once the work is queued. x and out are F32, F16 or BF16 (the model's dtype:
    // widened exactly, rounded to nearest even at the end). ids and weights are read before
    // returning; x and out must stay valid until sync().
    void submit(const void* x, WType x_type, const int64_t* ids, const float* weights, void* out, WType out_type,
                int tokens, int top_k);
    // Wait for the last submit; rethrows an error raised by the work.
    void sync();
    bool pending() const { return job_ != nullptr; }
    bool done() const { return job_ == nullptr || job_->done(); }
    const char* isa() const { return k_.isa; }

private:
    void plan(const int64_t* ids, const float* weights, int tokens, int top_k);
    void quantize_inputs(int token);
    void gate_up(int task, int worker);
    void quantize_hidden(int pair);
    void down(int task);
    void combine(int task);

    std::shared_ptr<ThreadPool> pool_;
    const KernelTable& k_;
    int E_, H_, I_;
    MatrixView gate_, up_, down_;
    ActFn act_;
    ActKind act_gate_, act_up_, act_down_;
    size_t xg_row_, xu_row_, hq_row_;

    // The current call's plan.
    const void* x_ = nullptr;
    void* out_ = nullptr;
    WType x_type_ = WType::F32, out_type_ = WType::F32;
    int T_ = 0, K_ = 0, P_ = 0;
    std::vector<int> counts_, offsets_, active_, pair_token_, token_pairs_;
    std::vector<float> pair_weight_;
    std::vector<const uint8_t*> pair_xg_, pair_xu_, pair_hq_;
    int chunk_i_ = 0, chunks_i_ = 0, chunk_h_ = 0, chunks_h_ = 0, combine_cols_ = 0, combine_col_chunks_ = 0;

    // The current call's buffers: inputs quantized for gate (kGateIn) and up (kUpIn), 16-bit
    // inputs widened to float32 (kWidened), the pairs' hidden rows in float32 (kHidden) and
    // quantized for down (kHiddenQ), the pairs' outputs (kPairOut), per-worker up results (kUp).
    enum Slot { kGateIn, kUpIn, kWidened, kHidden, kHiddenQ, kPairOut, kUp, kSlots };
    ScratchLease scratch_;
    std::shared_ptr<Job> job_;
};

// Rows per task when `parts` matrices of `rows` rows are split over `threads` threads:
// about 32 tasks per thread for load balance, at least 16 rows so a task amortizes its
// start, a multiple of 4, never more than `rows`.
int rows_per_task(int rows, int parts, int threads);

}  // namespace kt
