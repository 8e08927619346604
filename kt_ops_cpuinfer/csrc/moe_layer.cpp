// MoE layer implementation (see moe_layer.hpp for the phases and why they are split so).
#include "moe_layer.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace kt {
namespace {

// Tokens handled together in the gate/up phase: bounds the per-worker scratch for the up
// projection (kTokenGroup x rows-per-task floats) while amortizing each weight block over
// many tokens.
constexpr int kTokenGroup = 64;

void check_matrix(const MatrixView& m, const char* name, int rows, int cols) {
    if (m.data == nullptr) throw std::invalid_argument(std::string(name) + ": null weight pointer");
    if (m.rows != rows || m.cols != cols)
        throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(rows) + " x " +
                                    std::to_string(cols) + " per expert, got " + std::to_string(m.rows) + " x " +
                                    std::to_string(m.cols));
    const WTypeInfo& info = wtype_info(m.type);
    if (m.cols % info.block_values != 0)
        throw std::invalid_argument(std::string(name) + ": rows of " + std::to_string(m.cols) +
                                    " values are not whole " + info.name + " blocks of " +
                                    std::to_string(info.block_values));
    if (m.row_stride < row_bytes(m.type, m.cols))
        throw std::invalid_argument(std::string(name) + ": row stride is smaller than a row");
}

}  // namespace

int rows_per_task(int rows, int parts, int threads) {
    const long total = static_cast<long>(rows) * std::max(parts, 1);
    const long target = static_cast<long>(std::max(threads, 1)) * 32;
    long c = (total + target - 1) / target;
    c = std::max<long>(c, 16);
    c = (c + 3) & ~3L;
    return static_cast<int>(std::min<long>(c, rows));
}

MoELayer::MoELayer(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, int experts, int hidden,
                   int intermediate, const MatrixView& gate, const MatrixView& up, const MatrixView& down, ActFn act)
    : pool_(require_pool(std::move(pool), "MoELayer")), k_(kernels), E_(experts), H_(hidden), I_(intermediate),
      gate_(gate), up_(up), down_(down), act_(act), scratch_(pool_->scratch(), kSlots) {
    if (E_ < 1 || H_ < 1 || I_ < 1) throw std::invalid_argument("MoELayer: sizes must be positive");
    check_matrix(gate_, "gate_proj", I_, H_);
    check_matrix(up_, "up_proj", I_, H_);
    check_matrix(down_, "down_proj", H_, I_);
    act_gate_ = k_.act_for[static_cast<int>(gate_.type)];
    act_up_ = k_.act_for[static_cast<int>(up_.type)];
    act_down_ = k_.act_for[static_cast<int>(down_.type)];
    xg_row_ = act_row_bytes(act_gate_, H_);
    xu_row_ = act_row_bytes(act_up_, H_);
    hq_row_ = act_row_bytes(act_down_, I_);
    counts_.assign(static_cast<size_t>(E_), 0);
    offsets_.assign(static_cast<size_t>(E_) + 1, 0);
}

MoELayer::~MoELayer() {
    if (job_) {
        try {
            job_->wait();
        } catch (...) {
            // The caller never synced; the work's error has nobody left to report to.
        }
    }
}

void MoELayer::plan(const int64_t* ids, const float* weights, int tokens, int top_k) {
    T_ = tokens;
    K_ = top_k;
    std::fill(counts_.begin(), counts_.end(), 0);
    const size_t slots = static_cast<size_t>(tokens) * static_cast<size_t>(top_k);
    for (size_t s = 0; s < slots; ++s) {
        const int64_t e = ids[s];
        if (e >= 0 && e < E_) ++counts_[static_cast<size_t>(e)];
    }
    active_.clear();
    offsets_[0] = 0;
    for (int e = 0; e < E_; ++e) {
        offsets_[static_cast<size_t>(e) + 1] = offsets_[static_cast<size_t>(e)] + counts_[static_cast<size_t>(e)];
        if (counts_[static_cast<size_t>(e)] > 0) active_.push_back(e);
    }
    P_ = offsets_[static_cast<size_t>(E_)];

    // Buffers first, so the pointer tables below point into their final storage.
    const bool shared_x = act_up_ == act_gate_;
    uint8_t* xg = scratch_.get(kGateIn, std::max<size_t>(1, static_cast<size_t>(T_) * xg_row_));
    uint8_t* xu = shared_x ? xg : scratch_.get(kUpIn, std::max<size_t>(1, static_cast<size_t>(T_) * xu_row_));
    scratch_.get(kHidden, std::max<size_t>(1, static_cast<size_t>(P_) * static_cast<size_t>(I_) * 4));
    uint8_t* hq = scratch_.get(kHiddenQ, std::max<size_t>(1, static_cast<size_t>(P_) * hq_row_));
    scratch_.get(kPairOut, std::max<size_t>(1, static_cast<size_t>(P_) * static_cast<size_t>(H_) * 4));

    pair_token_.resize(static_cast<size_t>(P_));
    pair_weight_.resize(static_cast<size_t>(P_));
    pair_xg_.resize(static_cast<size_t>(P_));
    pair_xu_.resize(static_cast<size_t>(P_));
    pair_hq_.resize(static_cast<size_t>(P_));
    token_pairs_.assign(slots, -1);
    std::vector<int>& fill = counts_;  // reused as the running insert position per expert
    for (int e = 0; e < E_; ++e) fill[static_cast<size_t>(e)] = offsets_[static_cast<size_t>(e)];
    for (int t = 0; t < T_; ++t) {
        for (int k = 0; k < K_; ++k) {
            const size_t s = static_cast<size_t>(t) * static_cast<size_t>(K_) + static_cast<size_t>(k);
            const int64_t e = ids[s];
            if (e < 0 || e >= E_) continue;
            const int p = fill[static_cast<size_t>(e)]++;
            pair_token_[static_cast<size_t>(p)] = t;
            pair_weight_[static_cast<size_t>(p)] = weights[s];
            pair_xg_[static_cast<size_t>(p)] = xg + static_cast<size_t>(t) * xg_row_;
            pair_xu_[static_cast<size_t>(p)] = xu + static_cast<size_t>(t) * xu_row_;
            pair_hq_[static_cast<size_t>(p)] = hq + static_cast<size_t>(p) * hq_row_;
            token_pairs_[s] = p;
        }
    }
    for (int e = 0; e < E_; ++e) counts_[static_cast<size_t>(e)] = offsets_[static_cast<size_t>(e) + 1] - offsets_[static_cast<size_t>(e)];

    const int threads = pool_->threads();
    const int nactive = static_cast<int>(active_.size());
    chunk_i_ = rows_per_task(I_, nactive, threads);
    chunks_i_ = (I_ + chunk_i_ - 1) / chunk_i_;
    chunk_h_ = rows_per_task(H_, nactive, threads);
    chunks_h_ = (H_ + chunk_h_ - 1) / chunk_h_;
    combine_cols_ = std::min(H_, 512);  // combine() sums in a local buffer of this size
    combine_col_chunks_ = (H_ + combine_cols_ - 1) / combine_cols_;
    scratch_.get(kUp, static_cast<size_t>(threads) * kTokenGroup * static_cast<size_t>(chunk_i_) * 4);
}

void MoELayer::submit(const void* x, WType x_type, const int64_t* ids, const float* weights, void* out, WType out_type,
                      int tokens, int top_k) {
    if (job_) throw std::runtime_error("submit() while the previous submit() of this layer is pending; call sync() first");
    if (tokens < 0 || top_k < 0) throw std::invalid_argument("negative token count or top-k");
    x_ = x;
    out_ = out;
    x_type_ = x_type;
    out_type_ = out_type;
    // Until the job is submitted nothing will give the buffers back: a failure before then does.
    const ReleaseOnExit release_if_not_submitted([this] { if (!job_) scratch_.release(); });
    if (x_type != WType::F32) scratch_.get(kWidened, static_cast<size_t>(std::max(tokens, 1)) * static_cast<size_t>(H_) * 4);
    plan(ids, weights, tokens, top_k);
    const int nactive = static_cast<int>(active_.size());
    std::vector<Phase> phases;
    phases.push_back({P_ > 0 ? T_ : 0, [this](int t, int) { quantize_inputs(t); }});
    phases.push_back({nactive * chunks_i_, [this](int task, int worker) { gate_up(task, worker); }});
    phases.push_back({P_, [this](int p, int) { quantize_hidden(p); }});
    phases.push_back({nactive * chunks_h_, [this](int task, int) { down(task); }});
    phases.push_back({T_ * combine_col_chunks_, [this](int task, int) { combine(task); }});
    job_ = pool_->submit(std::move(phases));
}

void MoELayer::sync() {
    if (!job_) throw std::runtime_error("sync() without a pending submit()");
    std::shared_ptr<Job> job = std::move(job_);
    job_.reset();
    const ReleaseOnExit release([this] { scratch_.release(); });  // the buffers go back however the work ends
    job->wait();
}

void MoELayer::quantize_inputs(int t) {
    const size_t at = static_cast<size_t>(t) * static_cast<size_t>(H_);
    const float* x = static_cast<const float*>(x_) + at;
    if (x_type_ != WType::F32) {
        float* wide = reinterpret_cast<float*>(scratch_.data(kWidened)) + at;
        k_.widen_row(static_cast<const uint8_t*>(x_) + at * wtype_info(x_type_).block_bytes, x_type_, H_, wide);
        x = wide;
    }
    k_.quantize_row(act_gate_, x, H_, scratch_.data(kGateIn) + static_cast<size_t>(t) * xg_row_);
    if (act_up_ != act_gate_) k_.quantize_row(act_up_, x, H_, scratch_.data(kUpIn) + static_cast<size_t>(t) * xu_row_);
}

void MoELayer::gate_up(int task, int worker) {
    const int e = active_[static_cast<size_t>(task / chunks_i_)];
    const int r0 = (task % chunks_i_) * chunk_i_;
    const int nr = std::min(chunk_i_, I_ - r0);
    float* h = reinterpret_cast<float*>(scratch_.data(kHidden));
    float* u = reinterpret_cast<float*>(scratch_.data(kUp)) + static_cast<size_t>(worker) * kTokenGroup * chunk_i_;
    const int first = offsets_[static_cast<size_t>(e)], count = counts_[static_cast<size_t>(e)];
    for (int g = 0; g < count; g += kTokenGroup) {
        const int n = std::min(kTokenGroup, count - g);
        const int p0 = first + g;
        float* hp = h + static_cast<size_t>(p0) * static_cast<size_t>(I_) + r0;
        // gate straight into the hidden rows, up into scratch, then h = act(gate) * up in place
        k_.gemm(gate_.type, gate_.row(e, r0), gate_.row_stride, nr, H_, pair_xg_.data() + p0, n, hp,
                static_cast<size_t>(I_));
        k_.gemm(up_.type, up_.row(e, r0), up_.row_stride, nr, H_, pair_xu_.data() + p0, n, u,
                static_cast<size_t>(nr));
        for (int j = 0; j < n; ++j) {
            float* row = hp + static_cast<size_t>(j) * static_cast<size_t>(I_);
            k_.activate(act_, row, u + static_cast<size_t>(j) * static_cast<size_t>(nr), row, nr);
        }
    }
}

void MoELayer::quantize_hidden(int p) {
    const float* h = reinterpret_cast<const float*>(scratch_.data(kHidden)) + static_cast<size_t>(p) * static_cast<size_t>(I_);
    k_.quantize_row(act_down_, h, I_, scratch_.data(kHiddenQ) + static_cast<size_t>(p) * hq_row_);
}

void MoELayer::down(int task) {
    const int e = active_[static_cast<size_t>(task / chunks_h_)];
    const int r0 = (task % chunks_h_) * chunk_h_;
    const int nr = std::min(chunk_h_, H_ - r0);
    const int first = offsets_[static_cast<size_t>(e)], count = counts_[static_cast<size_t>(e)];
    float* y = reinterpret_cast<float*>(scratch_.data(kPairOut)) + static_cast<size_t>(first) * static_cast<size_t>(H_) + r0;
    k_.gemm(down_.type, down_.row(e, r0), down_.row_stride, nr, I_, pair_hq_.data() + first, count, y,
            static_cast<size_t>(H_));
}

void MoELayer::combine(int task) {
    const int t = task / combine_col_chunks_;
    const int c0 = (task % combine_col_chunks_) * combine_cols_;
    const int nc = std::min(combine_cols_, H_ - c0);
    const size_t at = static_cast<size_t>(t) * static_cast<size_t>(H_) + c0;
    float local[512];  // combine_cols_ <= 512: the sums before a 16-bit output is rounded
    float* out = out_type_ == WType::F32 ? static_cast<float*>(out_) + at : local;
    for (int c = 0; c < nc; ++c) out[c] = 0.0f;
    const float* y = reinterpret_cast<const float*>(scratch_.data(kPairOut));
    for (int k = 0; k < K_; ++k) {
        const int p = token_pairs_[static_cast<size_t>(t) * static_cast<size_t>(K_) + static_cast<size_t>(k)];
        if (p < 0) continue;
        const float w = pair_weight_[static_cast<size_t>(p)];
        const float* yp = y + static_cast<size_t>(p) * static_cast<size_t>(H_) + c0;
        for (int c = 0; c < nc; ++c) out[c] += w * yp[c];
    }
    if (out_type_ != WType::F32)
        k_.narrow_row(local, nc, out_type_, static_cast<uint8_t*>(out_) + at * wtype_info(out_type_).block_bytes);
}

}  // namespace kt
