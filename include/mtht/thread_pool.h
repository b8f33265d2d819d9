// A small persistent pool for intra-call parallelism. The calling thread always takes
// part; if another call is already using the helpers, the new call runs on its own
// thread alone (no queueing, no deadlock between concurrent callers).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

namespace mtht {

class ThreadPool {
 public:
  static ThreadPool& global() {
    static ThreadPool pool(default_threads());
    return pool;
  }

  static int default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(std::min(n, 64u));
  }

  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop_workers(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_.load(); }

  void set_num_threads(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> busy(busy_);  // wait until no call is running
    stop_workers();
    resize(n);
  }

  // Runs fn(i) for i in [0, n_tasks) over at most `max_threads` threads (0 = all).
  // Rethrows the first exception a task threw, after every task has finished.
  void parallel_for(size_t n_tasks, const std::function<void(size_t)>& fn, int max_threads = 0) {
    if (n_tasks == 0) return;
    int want = num_threads();
    if (max_threads > 0) want = std::min(want, max_threads);
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    // In a forked child the helper threads do not exist: run alone.
    if (n_tasks == 1 || want <= 1 || !busy.owns_lock() || workers_.empty() || getpid() != owner_pid_) {
      for (size_t i = 0; i < n_tasks; ++i) fn(i);
      return;
    }
    Job job{&fn, n_tasks};
    size_t helpers = std::min<size_t>({workers_.size(), static_cast<size_t>(want - 1), n_tasks - 1});
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &job;
      job.active = helpers;
      helpers_wanted_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    run_tasks(job);
    {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return job.active == 0; });
      job_ = nullptr;
    }
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    const std::function<void(size_t)>* fn;
    size_t n_tasks;
    std::atomic<size_t> next{0};
    size_t active = 0;  // helpers still working, guarded by mu_
    std::exception_ptr error;
    std::mutex error_mu;
  };

  static void run_tasks(Job& job) {
    for (;;) {
      size_t i = job.next.fetch_add(1);
      if (i >= job.n_tasks) return;
      try {
        (*job.fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(job.error_mu);
        if (!job.error) job.error = std::current_exception();
      }
    }
  }

  void resize(int n) {
    owner_pid_ = getpid();
    num_threads_.store(n);
    stopping_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stopping_ || (generation_ != seen && helpers_wanted_ > 0); });
        if (stopping_) return;
        seen = generation_;
        --helpers_wanted_;
        job = job_;
      }
      run_tasks(*job);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--job->active == 0) done_cv_.notify_all();
      }
    }
  }

  std::atomic<int> num_threads_{1};
  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the call that owns the helpers
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  Job* job_ = nullptr;
  size_t helpers_wanted_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  pid_t owner_pid_ = 0;
};

}  // namespace mtht
