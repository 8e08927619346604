// The attention core of MLA's absorbed form, over the cache as it is stored.
//
// With W_UK absorbed into the query, every head attends to the same cached latent rows
// (c_kv, kv_lora_rank wide) plus the shared rotary key (k_pe): scores = q_latent·c_kv +
// q_pe·k_pe, a softmax per query row, then the latent context = Σ p·c_kv. In torch that
// is a float32 copy of the cache (it is stored in the model's dtype), three batched
// matmuls and half a dozen elementwise ops per layer per token; here it is one job of
// three phases on the engine's pool: scores over tiles of keys (each cached row read once
// for all heads), the softmax per row, the weighted sum over slices of latent columns.
// Rows are query-major (row s * heads + h), the layout of the per-head products around it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine_types.hpp"
#include "kernel_table.hpp"
#include "scratch_pool.hpp"
#include "thread_pool.hpp"

namespace kt {

struct CachedRows {
    const uint8_t* data = nullptr;  // row t at data + t * stride
    WType type = WType::F32;        // F32, F16 or BF16
    size_t stride = 0;
};

class LatentAttention {
public:
    LatentAttention(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels);

    // q_latent [queries * heads, latent] and q_pe [queries * heads, rope], float32 contiguous;
    // query s sees keys [0, visible[s]) of `keys`; out [queries * heads, latent] float32.
    void forward(const float* q_latent, const float* q_pe, int queries, int heads, int latent, int rope,
                 const CachedRows& c_kv, const CachedRows& k_pe, int keys, const int32_t* visible, float scale,
                 float* out);
    // The same computation as three phases appended to `phases` (scores, softmax, weighted
    // sum), for a job that chains it with other ops; every pointer must stay valid, and this
    // object in no other job, until that job is done; then the job's owner calls release_scratch().
    void append_phases(std::vector<Phase>& phases, const float* q_latent, const float* q_pe, int queries, int heads,
                       int latent, int rope, const CachedRows& c_kv, const CachedRows& k_pe, int keys,
                       const int32_t* visible, float scale, float* out);
    const char* isa() const { return k_.isa; }
    // Give the scores buffer of the last append_phases back to the pool.
    void release_scratch() { scratch_.release(); }

private:
    std::shared_ptr<ThreadPool> pool_;
    const KernelTable& k_;
    ScratchLease scratch_;  // one slot: the scores [queries * heads, keys seen], float32
};

}  // namespace kt
