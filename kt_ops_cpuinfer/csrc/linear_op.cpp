// Linear op implementation (see linear_op.hpp).
#include "linear_op.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "moe_layer.hpp"

namespace kt {

LinearOp::LinearOp(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, const MatrixView& weight, int groups)
    : pool_(require_pool(std::move(pool), "LinearOp")), k_(kernels), w_(weight), groups_(groups),
      scratch_(pool_->scratch(), kSlots) {
    if (w_.data == nullptr || w_.rows < 1 || w_.cols < 1) throw std::invalid_argument("LinearOp: empty weight");
    if (groups_ < 1) throw std::invalid_argument("LinearOp: groups must be at least 1");
    const WTypeInfo& info = wtype_info(w_.type);
    if (w_.cols % info.block_values != 0)
        throw std::invalid_argument(std::string("LinearOp: rows of ") + std::to_string(w_.cols) +
                                    " values are not whole " + info.name + " blocks");
    act_ = k_.act_for[static_cast<int>(w_.type)];
    act_row_ = act_row_bytes(act_, w_.cols);
}

void LinearOp::forward(const void* x, WType x_type, int tokens, void* out, WType out_type, const float* bias) {
    if (tokens <= 0) return;
    std::vector<Phase> phases;
    const ReleaseOnExit release([this] { release_scratch(); });  // the buffers go back however the job ends
    append_phases(phases, x, x_type, tokens, out, out_type, bias);
    pool_->submit(std::move(phases))->wait();
}

void LinearOp::append_phases(std::vector<Phase>& phases, const void* x, WType x_type, int tokens, void* out,
                             WType out_type, const float* bias) {
    if (tokens <= 0) return;
    if (bias != nullptr && groups_ != 1) throw std::invalid_argument("LinearOp: a bias needs a single group");
    const int groups = groups_, cols = w_.cols, nrows = w_.rows;
    const int in_rows = tokens * groups;  // token t's group g input is quantized row t * groups + g
    uint8_t* xq = scratch_.get(kQuantized, static_cast<size_t>(in_rows) * act_row_);
    // A 16-bit input is widened row by row into float32 scratch, then quantized like a float32 one.
    float* xf = x_type == WType::F32 ? nullptr
                                     : reinterpret_cast<float*>(scratch_.get(kWidened, static_cast<size_t>(in_rows) * cols * 4));
    const size_t out_stride = static_cast<size_t>(groups) * nrows;
    float* y = out_type == WType::F32 ? static_cast<float*>(out)
                                      : reinterpret_cast<float*>(scratch_.get(kResults, static_cast<size_t>(tokens) * out_stride * 4));
    const size_t in_elt = wtype_info(x_type).block_bytes, out_elt = wtype_info(out_type).block_bytes;
    // The kernel takes one activation pointer per token; group g's list starts at g * tokens.
    rows_.resize(static_cast<size_t>(in_rows));
    for (int g = 0; g < groups; ++g)
        for (int t = 0; t < tokens; ++t)
            rows_[static_cast<size_t>(g) * tokens + t] = xq + (static_cast<size_t>(t) * groups + g) * act_row_;
    const int chunk = rows_per_task(nrows, groups, pool_->threads());
    const int chunks_per_group = (nrows + chunk - 1) / chunk;
    phases.push_back({in_rows, [=](int row, int) {
                          const size_t at = static_cast<size_t>(row) * static_cast<size_t>(cols);
                          const float* src = static_cast<const float*>(x) + at;
                          if (xf != nullptr) {
                              k_.widen_row(static_cast<const uint8_t*>(x) + at * in_elt, x_type, cols, xf + at);
                              src = xf + at;
                          }
                          k_.quantize_row(act_, src, cols, xq + static_cast<size_t>(row) * act_row_);
                      }});
    phases.push_back({groups * chunks_per_group, [=](int task, int) {
                          const int g = task / chunks_per_group;
                          const int r0 = (task % chunks_per_group) * chunk;
                          const int nr = std::min(chunk, nrows - r0);
                          float* o = y + static_cast<size_t>(g) * nrows + r0;
                          k_.gemm(w_.type, w_.row(g, r0), w_.row_stride, nr, cols,
                                  rows_.data() + static_cast<size_t>(g) * tokens, tokens, o, out_stride);
                          if (bias != nullptr)
                              for (int t = 0; t < tokens; ++t)
                                  for (int r = 0; r < nr; ++r) o[static_cast<size_t>(t) * out_stride + r] += bias[r0 + r];
                          if (y != out)  // this task's rows, rounded to the output's dtype
                              for (int t = 0; t < tokens; ++t) {
                                  const size_t at = static_cast<size_t>(t) * out_stride + static_cast<size_t>(g) * nrows + r0;
                                  k_.narrow_row(y + at, nr, out_type, static_cast<uint8_t*>(out) + at * out_elt);
                              }
                      }});
}

}  // namespace kt
