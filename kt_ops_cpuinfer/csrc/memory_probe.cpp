// Streaming read probe (see memory_probe.hpp). SSE2 loads of whole cache lines are far
// faster than DRAM on any x86-64, so the measured time is the memory's, not the loop's.
#include "memory_probe.hpp"

#include <emmintrin.h>

#include <atomic>
#include <vector>

namespace kt {

uint64_t stream_read(ThreadPool& pool, const uint8_t* data, size_t bytes) {
    constexpr size_t kChunk = size_t{1} << 20;
    const size_t lines = bytes / 64;
    const int tasks = static_cast<int>((bytes + kChunk - 1) / kChunk);
    std::atomic<uint64_t> total{0};
    std::vector<Phase> phases;
    phases.push_back({tasks, [&](int task, int) {
                          const size_t first = static_cast<size_t>(task) * (kChunk / 64);
                          const size_t last = first + kChunk / 64 < lines ? first + kChunk / 64 : lines;
                          __m128i acc0 = _mm_setzero_si128(), acc1 = _mm_setzero_si128();
                          for (size_t l = first; l < last; ++l) {
                              const __m128i* p = reinterpret_cast<const __m128i*>(data + l * 64);
                              acc0 = _mm_add_epi64(acc0, _mm_add_epi64(_mm_loadu_si128(p), _mm_loadu_si128(p + 1)));
                              acc1 = _mm_add_epi64(acc1, _mm_add_epi64(_mm_loadu_si128(p + 2), _mm_loadu_si128(p + 3)));
                          }
                          const __m128i s = _mm_add_epi64(acc0, acc1);
                          uint64_t v[2];
                          _mm_storeu_si128(reinterpret_cast<__m128i*>(v), s);
                          total.fetch_add(v[0] + v[1], std::memory_order_relaxed);
                      }});
    pool.submit(std::move(phases))->wait();
    return total.load();
}

}  // namespace kt
