// Scratch pool implementation (see scratch_pool.hpp for why ops share it).
#include "scratch_pool.hpp"

#include <algorithm>

namespace kt {

std::unique_ptr<AlignedBuffer> ScratchPool::take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = free_.size(), largest = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
        const size_t cap = free_[i]->capacity();
        if (cap >= bytes && (best == free_.size() || cap < free_[best]->capacity())) best = i;
        if (largest == free_.size() || cap > free_[largest]->capacity()) largest = i;
    }
    const size_t pick = best != free_.size() ? best : largest;
    std::unique_ptr<AlignedBuffer> buffer;
    if (pick != free_.size()) {
        buffer = std::move(free_[pick]);
        free_[pick] = std::move(free_.back());
        free_.pop_back();
    } else {
        buffer = std::make_unique<AlignedBuffer>();
    }
    const size_t before = buffer->capacity();
    try {
        buffer->reserve(bytes);
    } catch (...) {
        bytes_ -= before;  // reserve freed the old storage before failing
        throw;
    }
    bytes_ += buffer->capacity() - before;
    return buffer;
}

void ScratchPool::give(std::unique_ptr<AlignedBuffer> buffer) {
    if (!buffer) return;
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(buffer));
}

size_t ScratchPool::bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return bytes_;
}

void ScratchPool::release_free() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& buffer : free_) bytes_ -= buffer->capacity();
    free_.clear();
}

uint8_t* ScratchLease::get(int slot, size_t bytes) {
    std::unique_ptr<AlignedBuffer>& held = slots_.at(static_cast<size_t>(slot));
    if (!held || held->capacity() < bytes) {
        pool_.give(std::move(held));
        held = pool_.take(std::max<size_t>(bytes, 1));
    }
    return held->data();
}

uint8_t* ScratchLease::data(int slot) const {
    const std::unique_ptr<AlignedBuffer>& held = slots_.at(static_cast<size_t>(slot));
    return held ? held->data() : nullptr;
}

void ScratchLease::release() {
    for (auto& held : slots_) pool_.give(std::move(held));
}

size_t ScratchLease::bytes() const {
    size_t total = 0;
    for (const auto& held : slots_)
        if (held) total += held->capacity();
    return total;
}

}  // namespace kt
