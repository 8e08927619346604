// A streaming read over a buffer on the engine's own threads, for measuring the memory
// read bandwidth that bounds decode (the roofline the benchmark compares against).
#pragma once

#include <cstddef>
#include <cstdint>

#include "thread_pool.hpp"

namespace kt {

// Read every byte of [data, data + bytes) once, split over the pool's threads; returns a
// checksum so the reads cannot be optimized away.
uint64_t stream_read(ThreadPool& pool, const uint8_t* data, size_t bytes);

}  // namespace kt
