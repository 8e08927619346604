// A persistent pool of worker threads that runs jobs made of phases.
//
// Why phases: an MoE layer is a short pipeline (quantize inputs -> gate/up -> quantize the
// hidden rows -> down -> weighted sum) where each step needs all of the previous one.
// Each phase is a parallel-for over independent tasks, handed out dynamically through an
// atomic counter so uneven tasks (experts with different token counts) still keep every
// thread busy. A phase ends when its last task is done (not when every worker has checked
// in): a worker that wakes late, or is descheduled on a busy machine, never holds the
// others up, it simply joins the job at the phase it finds.
//
// Why persistent and asynchronous: decode calls the engine once per layer per token, so
// thread start-up must not be paid per call, and `submit` must return at once so the
// caller can compute the shared experts while the workers run. Jobs from different layers
// queue up in order; each job has its own completion state, so layers never wait on each
// other's results. Idle workers sleep on a condition variable. The ops' working buffers
// come from the pool's `ScratchPool`, lent for one call each (see scratch_pool.hpp).
//
// Why the waiting caller computes: a pool of N threads is N-1 workers plus whichever
// thread waits for a job (`Job::wait`), which runs queued jobs' tasks as thread 0 until
// its own job is done. A synchronous call (a linear layer in decode) then starts at once
// instead of paying for waking a sleeping worker and being woken again when it is done
// (about 100 us per job on a 2-core VM, against 150-500 us of work), and while the caller
// computes Python between submit and sync, the machine runs N threads, not N+1. One
// waiting thread at a time holds slot 0; any other waiter sleeps in 1 ms slices and retries.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <stdexcept>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "scratch_pool.hpp"

namespace kt {

// task(index, worker) for index in [0, ntasks); `worker` in [0, threads) picks scratch.
using TaskFn = std::function<void(int task, int worker)>;

struct Phase {
    int ntasks = 0;
    TaskFn fn;
};

class ThreadPool;

class Job {
public:
    explicit Job(std::vector<Phase> phases);
    // Return when every phase ran, computing queued tasks meanwhile when slot 0 is free;
    // rethrows the first exception a task raised.
    void wait();
    bool done() const { return done_.load(std::memory_order_acquire); }

private:
    friend class ThreadPool;
    std::vector<Phase> phases_;
    std::unique_ptr<std::atomic<int>[]> next_;      // next task index to hand out, per phase
    std::unique_ptr<std::atomic<int>[]> finished_;  // tasks completed, per phase
    std::atomic<int> phase_{0};                     // the phase being worked on
    std::atomic<bool> done_{false};
    uint64_t seq_ = 0;
    ThreadPool* pool_ = nullptr;  // the pool it was queued on (outlives it: callers hold the pool)
    std::mutex mutex_;
    std::condition_variable cv_;
    std::exception_ptr error_;
};

class ThreadPool {
public:
    explicit ThreadPool(int threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    // Threads computing a job: the workers plus the waiting caller.
    int threads() const { return threads_; }

    // Queue a job and return at once; the job runs after the jobs queued before it.
    std::shared_ptr<Job> submit(std::vector<Phase> phases);

    // Jobs finished since the pool started (an engine-side progress counter).
    uint64_t jobs_completed() const { return completed_.load(std::memory_order_acquire); }

    // The working buffers the ops on this pool borrow for their calls.
    ScratchPool& scratch() { return scratch_; }

private:
    friend class Job;
    void help(Job& job);
    void worker_loop(int index);
    std::shared_ptr<Job> next_job(uint64_t seen);
    void run_job(Job& job, int index);
    void advance(Job& job, int from);
    void finish_job(Job& job);

    int threads_;
    std::atomic<bool> slot0_taken_{false};  // a waiting caller is computing as thread 0
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Job>> queue_;
    std::atomic<uint64_t> completed_{0};
    uint64_t next_seq_ = 0;
    bool stop_ = false;
    ScratchPool scratch_;
};

// `pool`, or std::invalid_argument naming `op` when it is null: for the initializer lists of
// ops whose later members (their scratch lease) need the pool.
std::shared_ptr<ThreadPool> require_pool(std::shared_ptr<ThreadPool> pool, const char* op);

}  // namespace kt
