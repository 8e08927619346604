// Linear op implementation (see linear_op.hpp).
#include "linear_op.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "moe_layer.hpp"

namespace kt {

LinearOp::LinearOp(std::shared_ptr<ThreadPool> pool, const KernelTable& kernels, const MatrixView& weight)
    : pool_(std::move(pool)), k_(kernels), w_(weight) {
    if (!pool_) throw std::invalid_argument("LinearOp needs a thread pool");
    if (w_.data == nullptr || w_.rows < 1 || w_.cols < 1) throw std::invalid_argument("LinearOp: empty weight");
    const WTypeInfo& info = wtype_info(w_.type);
    if (w_.cols % info.block_values != 0)
        throw std::invalid_argument(std::string("LinearOp: rows of ") + std::to_string(w_.cols) +
                                    " values are not whole " + info.name + " blocks");
    act_ = k_.act_for[static_cast<int>(w_.type)];
    act_row_ = act_row_bytes(act_, w_.cols);
}

void LinearOp::forward(const float* x, int tokens, float* out, const float* bias) {
    if (tokens <= 0) return;
    uint8_t* xq = xq_.reserve(static_cast<size_t>(tokens) * act_row_);
    rows_.resize(static_cast<size_t>(tokens));
    for (int t = 0; t < tokens; ++t) rows_[static_cast<size_t>(t)] = xq + static_cast<size_t>(t) * act_row_;
    const int chunk = rows_per_task(w_.rows, 1, pool_->threads());
    const int chunks = (w_.rows + chunk - 1) / chunk;
    const int cols = w_.cols, nrows = w_.rows;
    std::vector<Phase> phases;
    phases.push_back({tokens, [=](int t, int) {
                          k_.quantize_row(act_, x + static_cast<size_t>(t) * static_cast<size_t>(cols), cols,
                                          xq + static_cast<size_t>(t) * act_row_);
                      }});
    phases.push_back({chunks, [=](int task, int) {
                          const int r0 = task * chunk;
                          const int nr = std::min(chunk, nrows - r0);
                          float* o = out + r0;
                          k_.gemm(w_.type, w_.row(0, r0), w_.row_stride, nr, cols, rows_.data(), tokens, o,
                                  static_cast<size_t>(nrows));
                          if (bias != nullptr)
                              for (int t = 0; t < tokens; ++t)
                                  for (int r = 0; r < nr; ++r) o[static_cast<size_t>(t) * nrows + r] += bias[r0 + r];
                      }});
    pool_->submit(std::move(phases))->wait();
}

}  // namespace kt
