// Working memory shared by every op that runs on one thread pool.
//
// Why shared: an op's working buffers (quantized activation rows, float32 results before
// rounding, an MoE layer's per-(token, expert) rows) grow with the tokens of a call: about
// 100 MB per DeepSeek-V2-Lite layer for a 512-token prompt. Owned by each op, they stayed
// allocated per layer after a long prompt (2.6 GB for 27 layers), and each layer of the
// first long prompt wrote fresh pages, which the kernel must fault in and zero (a third of
// that first prompt's time on the 2-core VMs). Yet only the ops of the jobs in flight use
// scratch at any moment: at most an MoE layer waiting for `sync` and the synchronous ops
// computed meanwhile. So an op borrows buffers for one call (`ScratchLease`) and gives
// them back when the call is done; the next op, usually the same step of the next layer,
// reuses the same, already mapped, pages. The memory kept is that of the largest calls in
// flight at once, and a steady decode allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "aligned_buffer.hpp"

namespace kt {

class ScratchPool {
public:
    // A free buffer of at least `bytes`: the smallest free one that is large enough; else the
    // largest free one, grown (so the pool holds no more buffers than were ever lent at once);
    // else a new one. Contents are undefined.
    std::unique_ptr<AlignedBuffer> take(size_t bytes);
    // Return a buffer taken from this pool.
    void give(std::unique_ptr<AlignedBuffer> buffer);
    // Capacity of every buffer the pool made, lent out or free.
    size_t bytes() const;
    // Drop the free buffers (the lent ones come back later and are kept).
    void release_free();

private:
    mutable std::mutex mutex_;
    std::vector<std::unique_ptr<AlignedBuffer>> free_;
    size_t bytes_ = 0;
};

// The buffers one op holds during one call, in numbered slots (one per role: inputs,
// results, ...). Released explicitly when the call's job is done, and on destruction.
class ScratchLease {
public:
    ScratchLease(ScratchPool& pool, int slots) : pool_(pool), slots_(static_cast<size_t>(slots)) {}
    ~ScratchLease() { release(); }
    ScratchLease(const ScratchLease&) = delete;
    ScratchLease& operator=(const ScratchLease&) = delete;

    // Slot `slot`'s storage, at least `bytes` (a larger buffer replaces a smaller one; its
    // contents are not kept).
    uint8_t* get(int slot, size_t bytes);
    // Slot `slot`'s storage as last returned by `get` (null when it holds none).
    uint8_t* data(int slot) const;
    // Give every slot's buffer back to the pool.
    void release();
    // Capacity held now.
    size_t bytes() const;

private:
    ScratchPool& pool_;
    std::vector<std::unique_ptr<AlignedBuffer>> slots_;
};

// Runs `release` when the enclosing scope ends, by return or by exception: how a call gives
// its borrowed buffers back however it ends, in one line at the top of the call.
template <class Release>
class ReleaseOnExit {
public:
    explicit ReleaseOnExit(Release release) : release_(std::move(release)) {}
    ~ReleaseOnExit() { release_(); }
    ReleaseOnExit(const ReleaseOnExit&) = delete;
    ReleaseOnExit& operator=(const ReleaseOnExit&) = delete;

private:
    Release release_;
};

}  // namespace kt
