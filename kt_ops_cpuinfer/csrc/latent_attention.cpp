// Latent attention implementation (see latent_attention.hpp).
#include "latent_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace kt {
namespace {

constexpr int kKeysPerTask = 32;     // a scores task: this many cached rows against every query row
constexpr int kColumnsPerTask = 64;  // a context task: this many latent columns ...
constexpr int kRowsPerTask = 16;     // ... of this many query rows
constexpr int kRowBlock = 16;        // query rows handed to a kernel call together (one query's heads, in decode)

}  // namespace

LatentAttention::LatentAttention(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels)
    : pool_(require_pool(std::move(pool), "LatentAttention")), k_(kernels), scratch_(pool_->scratch(), 1) {}

void LatentAttention::forward(const float* q_latent, const float* q_pe, int queries, int heads, int latent, int rope,
                              const CachedRows& c_kv, const CachedRows& k_pe, int keys, const int32_t* visible,
                              float scale, float* out) {
    const ReleaseOnExit release([this] { release_scratch(); });  // the scores go back however the job ends
    std::vector<Phase> phases;
    append_phases(phases, q_latent, q_pe, queries, heads, latent, rope, c_kv, k_pe, keys, visible, scale, out);
    if (!phases.empty()) pool_->submit(std::move(phases))->wait();
}

void LatentAttention::append_phases(std::vector<Phase>& phases, const float* q_latent, const float* q_pe, int queries,
                                    int heads, int latent, int rope, const CachedRows& c_kv, const CachedRows& k_pe,
                                    int keys, const int32_t* visible, float scale, float* out) {
    if (queries <= 0 || heads <= 0) return;
    if (latent <= 0 || rope < 0 || keys < 0) throw std::invalid_argument("LatentAttention: negative sizes");
    if (!is_float_type(c_kv.type) || !is_float_type(k_pe.type))
        throw std::invalid_argument("LatentAttention: cached rows must be F32, F16 or BF16");
    const int rows = queries * heads;
    int used = 0;  // keys any query sees: later slots are never read
    for (int s = 0; s < queries; ++s) {
        if (visible[s] < 0 || visible[s] > keys) throw std::invalid_argument("LatentAttention: visible keys out of range");
        used = std::max(used, static_cast<int>(visible[s]));
    }
    const size_t stride = static_cast<size_t>(std::max(used, 1));
    float* scores = reinterpret_cast<float*>(scratch_.get(0, static_cast<size_t>(rows) * stride * sizeof(float)));
    const KernelTable& k = k_;

    phases.push_back({(used + kKeysPerTask - 1) / kKeysPerTask, [=, &k](int task, int) {
                          const int t0 = task * kKeysPerTask;
                          const int nk = std::min(kKeysPerTask, used - t0);
                          // kRowBlock query rows at a time, each block only up to the keys its rows
                          // see (a causal prefill's early queries skip most tiles).
                          for (int row = 0; row < rows; row += kRowBlock) {
                              const int nq = std::min(kRowBlock, rows - row);
                              int longest = 0;
                              for (int j = 0; j < nq; ++j) longest = std::max(longest, static_cast<int>(visible[(row + j) / heads]));
                              const int nkb = std::min(nk, longest - t0);
                              if (nkb <= 0) continue;
                              const AttnDotPart parts[2] = {
                                  {q_latent + static_cast<size_t>(row) * latent, static_cast<size_t>(latent),
                                   c_kv.data + t0 * c_kv.stride, c_kv.type, c_kv.stride, latent},
                                  {q_pe + static_cast<size_t>(row) * rope, static_cast<size_t>(rope),
                                   k_pe.data + t0 * k_pe.stride, k_pe.type, k_pe.stride, rope}};
                              k.dot_rows(parts, rope > 0 ? 2 : 1, nq, nkb, scores + static_cast<size_t>(row) * stride + t0, stride);
                          }
                      }});
    phases.push_back({rows, [=, &k](int row, int) {
                          float* p = scores + static_cast<size_t>(row) * stride;
                          const int n = visible[row / heads];
                          k.softmax_row(p, n, scale);
                          for (int t = n; t < used; ++t) p[t] = 0.0f;  // rows are summed in blocks over the longest
                      }});
    const int col_tasks = (latent + kColumnsPerTask - 1) / kColumnsPerTask;
    const int row_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
    phases.push_back({col_tasks * row_tasks, [=, &k](int task, int) {
                          const int c0 = (task % col_tasks) * kColumnsPerTask;
                          const int nc = std::min(kColumnsPerTask, latent - c0);
                          const int r0 = (task / col_tasks) * kRowsPerTask;
                          const int r1 = std::min(rows, r0 + kRowsPerTask);
                          const size_t elt = c_kv.type == WType::F32 ? 4 : 2;
                          for (int row = r0; row < r1; row += kRowBlock) {
                              const int nq = std::min(kRowBlock, r1 - row);
                              int longest = 0;
                              for (int j = 0; j < nq; ++j) longest = std::max(longest, static_cast<int>(visible[(row + j) / heads]));
                              float* o = out + static_cast<size_t>(row) * latent + c0;
                              for (int j = 0; j < nq; ++j) std::memset(o + static_cast<size_t>(j) * latent, 0, static_cast<size_t>(nc) * sizeof(float));
                              k.weighted_rows(scores + static_cast<size_t>(row) * stride, stride, nq, c_kv.data + c0 * elt,
                                              c_kv.type, c_kv.stride, longest, nc, o, static_cast<size_t>(latent));
                          }
                      }});
}

}  // namespace kt
