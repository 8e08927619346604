// MLA's absorbed attention for a few query tokens (decode) as one engine job.
//
// Why: in decode, each DeepSeek layer's attention is six small engine calls (q, kv_a, the
// two per-head products, the core, o) with some thirty torch ops between them (splits,
// the rotary embedding, the norm, the cache write, casts). On the 2-core VMs those cost
// more than the arithmetic: about 1.9 ms per layer for 8.7 MB of weights that stream in
// under 0.6 ms. Here the whole step is one job of phases on the pool, the in-between work
// done by the pool's threads, the cache written in place.
//
// What it computes is exactly what KDeepseekV2Attention's absorbed form computes with the
// same engine ops, rounding where it rounds: projections written in the model's dtype,
// the norm with transformers' roundings, the rotary embedding in float32 rounded to the
// model's dtype (DeepSeek-V2's complex form) or in the model's dtype op by op (V3's
// cos/sin forms), the per-head products and the core in float32, the context rounded to
// the model's dtype before o_proj.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "scratch_pool.hpp"
#include "engine_types.hpp"
#include "kernel_table.hpp"
#include "latent_attention.hpp"
#include "linear_op.hpp"
#include "thread_pool.hpp"

namespace kt {

// How the rotary embedding turns rope-dim pairs (kt_models_deepseek.mla_rotary).
enum class RopeForm : int {
    Complex = 0,      // DeepSeek-V2: interleaved pairs times freqs_cis (cos, sin float32 pairs), stays interleaved
    Interleaved = 1,  // DeepSeek-V3 with rope_interleave: interleaved pairs in, halves out; cos/sin [rope]
    Half = 2,         // rotate-half: x * cos + rotate_half(x) * sin; cos/sin [rope]
};

// An RMSNorm's weight as the norm module holds it.
struct NormWeight {
    const uint8_t* data = nullptr;
    WType type = WType::F32;
    float eps = 1e-6f;
};

struct MLAShape {
    int heads, nope, rope, latent, v_dim;
};

class AbsorbedMLA {
public:
    // q_a / q_a_norm are null without q_lora (then q is q_proj; else q_b_proj after them).
    // uk: heads groups of [latent, nope]; uv: heads groups of [v_dim, latent]. The ops are
    // borrowed: the caller keeps them alive and does not use them concurrently.
    AbsorbedMLA(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, const MLAShape& shape, LinearOp* q_a,
                const NormWeight& q_a_norm, LinearOp* q, LinearOp* kv_a, const NormWeight& kv_norm, LinearOp* uk,
                LinearOp* uv, LinearOp* o, RopeForm rope_form, float scale);

    // x [tokens, hidden] and out [tokens, hidden] in `dtype`. Rotary tables: Complex:
    // cos_sin float32 [tokens, rope/2, 2]; else cos, sin [tokens, rope] of `table_type`.
    // The new tokens' c_kv and k_pe are written to cache rows start..start+tokens-1, then
    // token s attends to rows [0, visible[s]).
    void forward(const void* x, WType dtype, int tokens, const uint8_t* cos, const uint8_t* sin, WType table_type,
                 const CachedRows& c_kv, const CachedRows& k_pe, int start, int cache_rows, const int32_t* visible,
                 void* out);

private:
    // Give this call's buffers (its own, its ops', the core's) back to the pool.
    void release_scratch();
    void rotate(const float* x, const float* cos, const float* sin, WType dtype, float* out) const;
    // qt: the dtype of q's rows (the model's, or q_a's norm's output with q_lora).
    void token_step(int t, WType dtype, WType qt, const uint8_t* cos, const uint8_t* sin, WType table_type,
                    const CachedRows& c_kv, const CachedRows& k_pe, int slot);

    std::shared_ptr<ThreadPool> pool_;
    const KernelTable& k_;
    MLAShape d_;
    LinearOp *q_a_, *q_, *kv_a_, *uk_, *uv_, *o_;
    NormWeight q_a_norm_, kv_norm_;
    RopeForm rope_form_;
    float scale_;
    LatentAttention core_;
    // Per-call scratch, borrowed from the pool for the call: q_a rows (and normed), q and kv_a
    // outputs, q_nope rows, q_pe rows, q_latent, the latent context, the value context.
    enum Slot { kQa, kQaNormed, kQOut, kKvOut, kQNope, kQPe, kQLatent, kLatentCtx, kCtx, kSlots };
    ScratchLease scratch_;
    std::vector<int32_t> visible_;
};

}  // namespace kt
