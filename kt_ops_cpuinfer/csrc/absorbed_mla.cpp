// Absorbed MLA as one job (see absorbed_mla.hpp).
//
// Compiled for plain x86-64 like the pool: no FMA instruction exists here, so the rotary
// embedding's products and sums round one by one, as torch's elementwise ops do.
#include "absorbed_mla.hpp"

#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace kt {
namespace {

constexpr int kMaxRope = 256;

size_t elt(WType t) { return static_cast<size_t>(wtype_info(t).block_bytes); }

// torch's type promotion between two float types (a mixed 16-bit pair computes in float32).
WType promoted(WType a, WType b) { return a == b ? a : WType::F32; }

// One phase running both phases' tasks: independent work of two ops in one barrier's time.
Phase merged(Phase a, Phase b) {
    const int na = a.ntasks;
    return {na + b.ntasks, [fa = std::move(a.fn), fb = std::move(b.fn), na](int task, int worker) {
                if (task < na) fa(task, worker);
                else fb(task - na, worker);
            }};
}

void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("AbsorbedMLA: " + what);
}

}  // namespace

AbsorbedMLA::AbsorbedMLA(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, const MLAShape& shape,
                         LinearOp* q_a, const NormWeight& q_a_norm, LinearOp* q, LinearOp* kv_a,
                         const NormWeight& kv_norm, LinearOp* uk, LinearOp* uv, LinearOp* o, RopeForm rope_form,
                         float scale)
    : pool_(require_pool(std::move(pool), "AbsorbedMLA")), k_(kernels), d_(shape), q_a_(q_a), q_(q), kv_a_(kv_a),
      uk_(uk), uv_(uv), o_(o), q_a_norm_(q_a_norm), kv_norm_(kv_norm), rope_form_(rope_form), scale_(scale),
      core_(pool_, kernels), scratch_(pool_->scratch(), kSlots) {
    require(q_ && kv_a_ && uk_ && uv_ && o_, "every projection is needed");
    require(d_.heads > 0 && d_.nope > 0 && d_.latent > 0 && d_.v_dim > 0, "empty dimensions");
    require(d_.rope > 0 && d_.rope % 2 == 0 && d_.rope <= kMaxRope, "the rope dimension must be even and at most 256");
    require(q_->rows() == d_.heads * (d_.nope + d_.rope), "q has " + std::to_string(q_->rows()) + " outputs, expected heads * (nope + rope)");
    require(kv_a_->rows() == d_.latent + d_.rope, "kv_a has " + std::to_string(kv_a_->rows()) + " outputs, expected latent + rope");
    require(uk_->groups() == d_.heads && uk_->rows() == d_.latent && uk_->cols() == d_.nope, "W_UK must be heads x [latent, nope]");
    require(uv_->groups() == d_.heads && uv_->rows() == d_.v_dim && uv_->cols() == d_.latent, "W_UV must be heads x [v, latent]");
    require(o_->cols() == d_.heads * d_.v_dim, "o_proj takes heads * v inputs");
    if (q_a_ != nullptr) {
        require(q_a_norm_.data != nullptr && is_float_type(q_a_norm_.type), "q_a needs its norm's weight");
        require(q_->cols() == q_a_->rows(), "q_b takes q_a's outputs");
        require(q_a_->cols() == kv_a_->cols(), "q_a and kv_a take the same input");
    } else {
        require(q_->cols() == kv_a_->cols(), "q and kv_a take the same input");
    }
    require(kv_norm_.data != nullptr && is_float_type(kv_norm_.type), "kv_a needs its norm's weight");
    require(o_->rows() == kv_a_->cols(), "o_proj writes the hidden size");
}

// The rope part `x` of one row, rotated; the values come back representable in `t`
// (rounded where torch rounds: once at the end for the complex form, after every op for
// the cos/sin forms, which torch computes in the tensors' dtype).
void AbsorbedMLA::rotate(const float* x, const float* cos, const float* sin, WType t, float* out) const {
    const int n = d_.rope, half = n / 2;
    uint8_t tmp[kMaxRope * 4];
    auto round_all = [&](float* v, int count) {
        if (t == WType::F32) return;
        k_.narrow_row(v, count, t, tmp);
        k_.widen_row(tmp, t, count, v);
    };
    if (rope_form_ == RopeForm::Complex) {  // cos, sin: interleaved (re, im) pairs
        for (int i = 0; i < half; ++i) {
            const float a = x[2 * i], b = x[2 * i + 1], c = cos[2 * i], s = cos[2 * i + 1];
            const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
            out[2 * i] = ac - bs;
            out[2 * i + 1] = as + bc;
        }
        round_all(out, n);
        return;
    }
    float p[kMaxRope], r[kMaxRope];
    if (rope_form_ == RopeForm::Interleaved) {  // halves out: x1*c - x2*s | x2*c + x1*s
        for (int i = 0; i < half; ++i) {
            p[i] = x[2 * i] * cos[i];
            r[i] = x[2 * i + 1] * sin[i];
            p[half + i] = x[2 * i + 1] * cos[i];
            r[half + i] = x[2 * i] * sin[i];
        }
        round_all(p, n);
        round_all(r, n);
        for (int i = 0; i < half; ++i) {
            out[i] = p[i] - r[i];
            out[half + i] = p[half + i] + r[half + i];
        }
    } else {  // rotate-half: x * cos + cat(-x2, x1) * sin
        for (int i = 0; i < n; ++i) {
            p[i] = x[i] * cos[i];
            r[i] = (i < half ? -x[i + half] : x[i - half]) * sin[i];
        }
        round_all(p, n);
        round_all(r, n);
        for (int i = 0; i < n; ++i) out[i] = p[i] + r[i];
    }
    round_all(out, n);
}

// Token t between the projections and the per-head products: the normed latent and the
// rotated k_pe into cache row `slot`, the rotated q_pe rows (float32) and the q_nope rows.
// CachedRows are read-only for the core; this step is the one writer of the cache (row
// `slot` only, which no other task of the job touches before the core's phases).
void AbsorbedMLA::token_step(int t, WType dtype, WType qt, const uint8_t* cos, const uint8_t* sin, WType table_type,
                             const CachedRows& c_kv, const CachedRows& k_pe, int slot) {
    const MLAShape& d = d_;
    const size_t kv_row = static_cast<size_t>(t) * (d.latent + d.rope) * elt(dtype);
    const uint8_t* kv = scratch_.data(kKvOut) + kv_row;
    k_.rms_norm_row(kv, dtype, d.latent, kv_norm_.data, kv_norm_.type, kv_norm_.eps,
                    const_cast<uint8_t*>(c_kv.data) + static_cast<size_t>(slot) * c_kv.stride, c_kv.type);

    float c[kMaxRope], s[kMaxRope], x[kMaxRope], y[kMaxRope];
    const int table = d.rope;  // values per token: rope/2 (cos, sin) pairs, or cos and sin of rope each
    if (rope_form_ == RopeForm::Complex) {
        std::memcpy(c, cos + static_cast<size_t>(t) * table * 4, static_cast<size_t>(table) * 4);
    } else {
        k_.widen_row(cos + static_cast<size_t>(t) * table * elt(table_type), table_type, table, c);
        k_.widen_row(sin + static_cast<size_t>(t) * table * elt(table_type), table_type, table, s);
    }
    k_.widen_row(kv + static_cast<size_t>(d.latent) * elt(dtype), dtype, d.rope, x);
    rotate(x, c, s, dtype, y);
    k_.narrow_row(y, d.rope, k_pe.type, const_cast<uint8_t*>(k_pe.data) + static_cast<size_t>(slot) * k_pe.stride);

    const size_t head_in = static_cast<size_t>(d.nope + d.rope) * elt(qt), nope_bytes = static_cast<size_t>(d.nope) * elt(qt);
    const uint8_t* q = scratch_.data(kQOut) + static_cast<size_t>(t) * d.heads * head_in;
    uint8_t* nope = scratch_.data(kQNope) + static_cast<size_t>(t) * d.heads * nope_bytes;
    float* pe = reinterpret_cast<float*>(scratch_.data(kQPe)) + static_cast<size_t>(t) * d.heads * d.rope;
    for (int h = 0; h < d.heads; ++h) {
        std::memcpy(nope + h * nope_bytes, q + h * head_in, nope_bytes);
        k_.widen_row(q + h * head_in + nope_bytes, qt, d.rope, x);
        rotate(x, c, s, qt, pe + static_cast<size_t>(h) * d.rope);  // exact in qt already: the core reads float32
    }
}

void AbsorbedMLA::forward(const void* x, WType dtype, int tokens, const uint8_t* cos, const uint8_t* sin,
                          WType table_type, const CachedRows& c_kv, const CachedRows& k_pe, int start, int cache_rows,
                          const int32_t* visible, void* out) {
    if (tokens <= 0) return;
    const MLAShape& d = d_;
    require(is_float_type(dtype), "activations must be F32, F16 or BF16");
    require(c_kv.type == promoted(dtype, kv_norm_.type), "the cached latents must have the norm's output dtype");
    require(k_pe.type == dtype, "the cached k_pe must have the activations' dtype");
    require(rope_form_ == RopeForm::Complex || table_type == dtype, "cos/sin must have the activations' dtype");
    require(start >= 0 && start + tokens <= cache_rows, "the new tokens do not fit in the cache");
    visible_.assign(visible, visible + tokens);
    for (int v : visible_) require(v >= 0 && v <= cache_rows, "visible keys out of range");

    // Every op's borrowed buffers go back to the pool when the job is done or anything failed.
    const ReleaseOnExit release([this] { release_scratch(); });
    const WType qt = q_a_ != nullptr ? promoted(dtype, q_a_norm_.type) : dtype;
    const size_t T = static_cast<size_t>(tokens);
    uint8_t* q_out = scratch_.get(kQOut, T * d.heads * (d.nope + d.rope) * elt(qt));
    uint8_t* kv_out = scratch_.get(kKvOut, T * (d.latent + d.rope) * elt(dtype));
    scratch_.get(kQNope, T * d.heads * d.nope * elt(qt));
    scratch_.get(kQPe, T * d.heads * d.rope * 4);
    float* q_latent = reinterpret_cast<float*>(scratch_.get(kQLatent, T * d.heads * d.latent * 4));
    float* latent_ctx = reinterpret_cast<float*>(scratch_.get(kLatentCtx, T * d.heads * d.latent * 4));
    uint8_t* ctx = scratch_.get(kCtx, T * d.heads * d.v_dim * elt(dtype));

    std::vector<Phase> phases, a, b;
    // 1. the projections of x: q (or q_a) and kv_a, side by side in the same two phases.
    LinearOp* first = q_a_ != nullptr ? q_a_ : q_;
    const int first_rows = first->rows();
    uint8_t* first_out = q_a_ != nullptr ? scratch_.get(kQa, T * first_rows * elt(dtype)) : q_out;
    first->append_phases(a, x, dtype, tokens, first_out, dtype, nullptr);
    kv_a_->append_phases(b, x, dtype, tokens, kv_out, dtype, nullptr);
    phases.push_back(merged(std::move(a[0]), std::move(b[0])));
    phases.push_back(merged(std::move(a[1]), std::move(b[1])));
    if (q_a_ != nullptr) {  // q_b(norm(q_a x))
        uint8_t* normed = scratch_.get(kQaNormed, T * first_rows * elt(qt));
        const NormWeight nw = q_a_norm_;
        const KernelTable& k = k_;
        const size_t in_row = static_cast<size_t>(first_rows) * elt(dtype), out_row = static_cast<size_t>(first_rows) * elt(qt);
        phases.push_back({tokens, [=, &k](int t, int) {
                              k.rms_norm_row(first_out + t * in_row, dtype, first_rows, nw.data, nw.type, nw.eps,
                                             normed + t * out_row, qt);
                          }});
        q_->append_phases(phases, normed, qt, tokens, q_out, qt, nullptr);
    }
    // 2. per token: norm, rotary, cache rows, the per-head rows of q.
    phases.push_back({tokens, [=](int t, int) { token_step(t, dtype, qt, cos, sin, table_type, c_kv, k_pe, start + t); }});
    // 3. q_nope W_UK per head, the core over the cache, the latent context W_UV per head.
    uk_->append_phases(phases, scratch_.data(kQNope), qt, tokens, q_latent, WType::F32, nullptr);
    core_.append_phases(phases, q_latent, reinterpret_cast<const float*>(scratch_.data(kQPe)), tokens, d.heads, d.latent,
                        d.rope, c_kv, k_pe, cache_rows, visible_.data(), scale_, latent_ctx);
    uv_->append_phases(phases, latent_ctx, WType::F32, tokens, ctx, dtype, nullptr);
    // 4. o_proj on the context rounded to the model's dtype.
    o_->append_phases(phases, ctx, dtype, tokens, out, dtype, nullptr);
    pool_->submit(std::move(phases))->wait();
}

void AbsorbedMLA::release_scratch() {
    for (LinearOp* op : {q_a_, q_, kv_a_, uk_, uv_, o_})
        if (op != nullptr) op->release_scratch();
    core_.release_scratch();
    scratch_.release();
}

}  // namespace kt
