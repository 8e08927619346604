// Thread pool implementation (see thread_pool.hpp for the design).
#include "thread_pool.hpp"

#include <immintrin.h>
#include <sched.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <utility>

namespace kt {
namespace {

// Waiting for the rest of a phase: pause-spin first (the others are a task away), then
// yield so an oversubscribed machine can run the thread everyone is waiting for.
template <class Ready>
void spin_until(Ready ready) {
    for (int i = 0; !ready(); ++i) {
        if (i < 2048) _mm_pause();
        else sched_yield();
    }
}

}  // namespace

Job::Job(std::vector<Phase> phases)
    : phases_(std::move(phases)),
      next_(new std::atomic<int>[phases_.size() + 1]),
      finished_(new std::atomic<int>[phases_.size() + 1]) {
    for (size_t i = 0; i <= phases_.size(); ++i) {
        next_[i].store(0, std::memory_order_relaxed);
        finished_[i].store(0, std::memory_order_relaxed);
    }
}

// A waiter that finds slot 0 taken sleeps in short slices and retries: the thread holding
// it leaves once its own job is done, and with no workers (threads == 1) nobody else
// would run the jobs still queued.
void Job::wait() {
    while (!done()) {
        if (pool_ != nullptr) pool_->help(*this);
        // Most often the job is done but for its retirement by the thread that ran its last
        // task: sleeping here would put a futex wake-up (tens of µs on a VM) on every call.
        for (int i = 0; i < 4096 && !done(); ++i) _mm_pause();
        if (done()) break;
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait_for(lock, std::chrono::milliseconds(1), [this] { return done(); });
    }
    if (error_) std::rethrow_exception(error_);
}

ThreadPool::ThreadPool(int threads) : threads_(threads) {
    if (threads < 1) throw std::invalid_argument("a thread pool needs at least one thread");
    workers_.reserve(static_cast<size_t>(threads - 1));
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
}

std::shared_ptr<Job> ThreadPool::submit(std::vector<Phase> phases) {
    auto job = std::make_shared<Job>(std::move(phases));
    if (job->phases_.empty()) {  // nothing to run: done at once
        job->done_.store(true, std::memory_order_release);
        return job;
    }
    job->pool_ = this;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job->seq_ = ++next_seq_;
        queue_.push_back(job);
    }
    cv_.notify_all();
    return job;
}

// The waiting caller works through the queue from its front (the jobs before its own must
// finish first anyway) until its job is done. A front job whose phases are all done is
// being retired by the thread that finished it; the caller waits for that in a pause loop.
void ThreadPool::help(Job& job) {
    bool expected = false;
    if (!slot0_taken_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return;
    while (!job.done()) {
        std::shared_ptr<Job> front;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!queue_.empty()) front = queue_.front();
        }
        if (!front) break;  // our job left the queue: it is done (marked before it is popped)
        if (front->phase_.load(std::memory_order_acquire) >= static_cast<int>(front->phases_.size())) {
            _mm_pause();
            continue;
        }
        run_job(*front, 0);
    }
    slot0_taken_.store(false, std::memory_order_release);
}

// Idle workers sleep at once instead of polling for the next job: between two layers the
// caller computes attention or shared experts, and with one compute thread per core (the
// caller being one of them) a polling worker would take a core from it. Waking costs a
// few microseconds per job, small against a layer's milliseconds.
std::shared_ptr<Job> ThreadPool::next_job(uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return stop_ || (!queue_.empty() && queue_.front()->seq_ > seen); });
    if (stop_ && (queue_.empty() || queue_.front()->seq_ <= seen)) return nullptr;
    return queue_.front();
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    while (std::shared_ptr<Job> job = next_job(seen)) {
        seen = job->seq_;
        run_job(*job, index);
    }
}

void ThreadPool::run_job(Job& job, int index) {
    const int nphases = static_cast<int>(job.phases_.size());
    for (int p = job.phase_.load(std::memory_order_acquire); p < nphases; p = job.phase_.load(std::memory_order_acquire)) {
        const Phase& phase = job.phases_[static_cast<size_t>(p)];
        if (phase.ntasks == 0) {
            int expected = p;  // an empty phase ends as soon as someone sees it
            if (job.phase_.compare_exchange_strong(expected, p + 1, std::memory_order_acq_rel)) advance(job, p);
            continue;
        }
        for (int t; (t = job.next_[p].fetch_add(1, std::memory_order_relaxed)) < phase.ntasks;) {
            try {
                phase.fn(t, index);
            } catch (...) {
                std::lock_guard<std::mutex> lock(job.mutex_);
                if (!job.error_) job.error_ = std::current_exception();
            }
            if (job.finished_[p].fetch_add(1, std::memory_order_acq_rel) + 1 == phase.ntasks) {
                job.phase_.store(p + 1, std::memory_order_release);  // this thread did the phase's last task
                advance(job, p);
            }
        }
        // No task left to take: wait until whoever holds the last ones has finished them.
        spin_until([&] { return job.phase_.load(std::memory_order_acquire) > p; });
    }
}

void ThreadPool::advance(Job& job, int from) {
    if (from + 1 == static_cast<int>(job.phases_.size())) finish_job(job);
}

// The job is marked done first, so its caller (spinning in wait()) returns while this thread
// makes the syscalls that wake sleeping workers. A caller that submits its next job before the
// pop finds this one at the queue front with all phases done and pause-waits in help().
void ThreadPool::finish_job(Job& job) {
    {
        std::lock_guard<std::mutex> lock(job.mutex_);
        job.done_.store(true, std::memory_order_release);
    }
    job.cv_.notify_all();
    {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.pop_front();
    }
    cv_.notify_all();  // workers waiting for the next job re-check the queue front
    completed_.fetch_add(1, std::memory_order_acq_rel);
}

std::shared_ptr<ThreadPool> require_pool(std::shared_ptr<ThreadPool> pool, const char* op) {
    if (!pool) throw std::invalid_argument(std::string(op) + " needs a thread pool");
    return pool;
}

}  // namespace kt
