// A growable, 64-byte aligned scratch buffer that never shrinks.
//
// Each MoE layer (and linear op) owns its buffers so layers share no mutable state; they
// grow to the largest batch seen and are then reused, so steady-state decode allocates
// nothing. Alignment to a cache line keeps quantized activation rows from splitting loads
// across lines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace kt {

class AlignedBuffer {
public:
    AlignedBuffer() = default;
    ~AlignedBuffer() { std::free(data_); }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;

    // At least `bytes` of storage; previous contents are not kept when it grows.
    uint8_t* reserve(size_t bytes) {
        if (bytes > capacity_) {
            std::free(data_);
            data_ = nullptr;
            capacity_ = 0;
            const size_t rounded = (bytes + 63) & ~static_cast<size_t>(63);
            void* p = std::aligned_alloc(64, rounded);
            if (p == nullptr) throw std::bad_alloc();
            data_ = static_cast<uint8_t*>(p);
            capacity_ = rounded;
        }
        return data_;
    }
    uint8_t* data() const { return data_; }
    size_t capacity() const { return capacity_; }

private:
    uint8_t* data_ = nullptr;
    size_t capacity_ = 0;
};

}  // namespace kt
