// A small persistent pool for intra-call parallelism. The calling thread always takes
// part; if another call is already using the helpers, the new call runs on its own
// thread alone (no queueing, no deadlock between concurrent callers). A call may run in
// phases (each finished before the next starts) with one wake-up of the helpers, and
// threads spin briefly before they sleep, since waking one costs about 20 us here. A call
// waits only for the helpers that joined it before all its tasks were taken.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <exception>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <pthread.h>
#ifdef __linux__
#include <sched.h>
#endif

#include "mtht/cgroup_limits.h"
#include "mtht/spin_pause.h"

namespace mtht {

class ThreadPool {
 public:
  static ThreadPool& global() {
    static ThreadPool pool(default_threads());
    static const bool forks_handled = (pthread_atfork(nullptr, nullptr, [] { global().forget_helpers(); }), true);
    (void)forks_handled;
    return pool;
  }

  // The count MTHT_NUM_THREADS names: 0 when it is unset or empty, -1 when it is not a
  // whole number from 1 to kMaxThreads written in ASCII digits alone (the Python package
  // refuses such a value at import; the pool passes over it).
  static int named_threads() {
    const char* named = std::getenv("MTHT_NUM_THREADS");
    if (!named || !*named) return 0;
    int n = 0;
    for (const char* c = named; *c; ++c) {
      if (*c < '0' || *c > '9') return -1;
      n = n * 10 + (*c - '0');
      if (n > kMaxThreads) return -1;
    }
    return n >= 1 ? n : -1;
  }

  // MTHT_NUM_THREADS when it names a count. Otherwise the cores this process may run on
  // (its CPU affinity: taskset, a container's cpuset, an MPI launcher's binding), not all
  // the machine's: more threads than those would take turns on them. Fewer where its
  // control groups allow less CPU time than that (a container's CPU limit), whose threads
  // beyond it would be stopped. At most 64.
  static int default_threads() {
    if (const int named = named_threads(); named > 0) return named;
    int n = 0;
#ifdef __linux__
    cpu_set_t cores;
    if (sched_getaffinity(0, sizeof cores, &cores) == 0) n = CPU_COUNT(&cores);
#endif
    if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());  // elsewhere, or over 1024 cores
#ifdef __linux__
    const int limit = cgroup_cpu_limit();
    if (limit > 0) n = n <= 0 ? limit : std::min(n, limit);
#endif
    return n <= 0 ? 1 : std::min(n, 64);
  }

  // A pool whose helpers the system will not start (no more threads to give) runs calls
  // with those it got, the calling thread at least; set_num_threads may ask again later.
  explicit ThreadPool(int n) {
    try {
      resize(n);
    } catch (const std::exception&) {
      num_threads_.store(helpers_.load() + 1);
    }
  }
  ~ThreadPool() { stop_workers(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_.load(); }

  // The threads a call can have now: num_threads, or 1 in a forked child whose pool has no
  // helpers yet (forget_helpers).
  int usable_threads() const { return std::min(num_threads_.load(), helpers_.load() + 1); }

  // Whether the calling thread is one of a pool's helper threads.
  static bool on_helper() { return on_helper_flag(); }

  // Whether the calling thread runs a task of a call that has helpers (on a helper, or on
  // the thread that made the call): a call it makes now runs on it alone.
  static bool in_shared_call() { return on_helper_flag() || calling_flag(); }

  // Calls use n threads from now on. Helpers are only ever added: one left over by a smaller
  // n sleeps, and is woken again when n grows back (a benchmark that alternates one thread
  // and two found a new helper slower to join than one that had worked before).
  // At most kMaxThreads: a count meant as something else (a size, an id) would otherwise
  // start threads until the system has no more to give, for every process of the machine.
  static constexpr int kMaxThreads = 1024;
  void set_num_threads(int n) {
    if (n < 1 || n > kMaxThreads)
      throw std::invalid_argument("num_threads must be from 1 to " + std::to_string(kMaxThreads) + ", got " +
                                  std::to_string(n));
    std::lock_guard<std::mutex> busy(busy_);  // wait until no call is running
    try {
      resize(n);
    } catch (const std::system_error& e) {  // the bare text of errno said nothing of threads
      throw std::runtime_error("could not start the threads for num_threads = " + std::to_string(n) + " (" +
                               e.what() + "); calls go on with " + std::to_string(num_threads()));
    }
  }

  // Runs fn(i) for i in [0, n_tasks) over at most `max_threads` threads (0 = all).
  // Rethrows the first exception a task threw, after every task has finished.
  void parallel_for(size_t n_tasks, const std::function<void(size_t)>& fn, int max_threads = 0) {
    const size_t sizes[1] = {n_tasks};
    run(sizes, 1, [&](size_t, size_t i) { fn(i); }, false, max_threads);
  }

  // Runs fn(phase, i) for i in [0, sizes[phase]) of each phase in turn, over at most
  // `max_threads` threads (0 = all): every task of a phase finishes before any task of the
  // next starts, within one wake-up of the helpers. A thread that reaches a phase early
  // waits (spinning: phases are short) only for tasks that running threads have already
  // taken, never for a thread that has not started. Once a task throws, the tasks not yet
  // started are skipped; the first exception is rethrown after every task has finished.
  // At most kMaxPhases phases. Allocates nothing, so that a write can use it once it has
  // started changing a table (fn is called through a reference to it).
  template <class Fn>
  void parallel_phases(std::initializer_list<size_t> sizes, Fn&& fn, int max_threads = 0) {
    if (sizes.size() > kMaxPhases) throw std::logic_error("too many phases");
    const std::function<void(size_t, size_t)> call(std::ref(fn));  // holds the reference: no allocation
    run(sizes.begin(), sizes.size(), call, true, max_threads);
  }

  static constexpr size_t kMaxPhases = 8;

 private:
  struct Job {
    const std::function<void(size_t, size_t)>* fn;
    size_t starts[kMaxPhases + 1];  // first task of each phase, then the number of tasks
    size_t total = 0;               // tasks in all (starts[phases])
    bool skip_after_error;
    std::atomic<size_t> next{0};
    std::atomic<size_t> finished{0};
    std::atomic<bool> failed{false};
    // Helpers that joined the call (under mu_, while it is open) and that left it: the call
    // returns once every helper that joined has left.
    size_t joined = 0;
    std::atomic<size_t> left{0};
    std::exception_ptr error;
    std::mutex error_mu;
  };

  void run(const size_t* sizes, size_t phases, const std::function<void(size_t, size_t)>& fn, bool skip_after_error,
           int max_threads) {
    Job job;
    job.fn = &fn;
    job.skip_after_error = skip_after_error;
    job.starts[0] = 0;
    size_t widest = 0;
    for (size_t p = 0; p < phases; ++p) {
      job.starts[p + 1] = job.starts[p] + sizes[p];
      widest = std::max(widest, sizes[p]);
    }
    job.total = job.starts[phases];
    if (job.total == 0) return;
    int want = num_threads();
    if (max_threads > 0) want = std::min(want, max_threads);
    // A call from inside a task of a call with helpers runs alone: the helpers are busy, and
    // the thread that made the outer call must not try the lock it holds.
    if (widest == 1 || want <= 1 || in_shared_call()) return run_alone(job);
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty()) return run_alone(job);
    size_t helpers = std::min<size_t>({workers_.size(), static_cast<size_t>(want - 1), widest - 1});
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &job;
      helpers_wanted_ = helpers;
      ++generation_;
    }
    for (size_t i = 0; i < helpers; ++i) cv_.notify_one();  // not the helpers a smaller count left asleep
    {
      const Calling calling;
      run_tasks(job);
    }
    // Every task has been taken. A helper that has not joined yet will find the call
    // closed and go back to sleep: the call waits only for the helpers that joined it,
    // never for one still waking up (in a virtual machine whose other core sat idle for a
    // few milliseconds, that took up to half a millisecond).
    size_t joined;
    {
      std::lock_guard<std::mutex> lk(mu_);
      helpers_wanted_ = 0;
      job_ = nullptr;
      joined = job.joined;  // final: no helper joins a closed call
    }
    // The helpers that joined finish their last tasks within microseconds: waiting for them
    // on the condition variable alone would add the time to wake this thread (about 20 us).
    spin_until([&] { return job.left.load(std::memory_order_acquire) == joined; });
    {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return job.left.load() == joined; });
    }
    if (job.error) std::rethrow_exception(job.error);
  }

  // Spins (for at most about 50 us) until done() holds; returns whether it does.
  template <class Done>
  static bool spin_until(Done&& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (done()) return true;
        spin_pause();
      }
      if (std::chrono::steady_clock::now() > deadline) return false;
    }
  }

  // The tasks of a call that runs on the calling thread alone, in order, as run_tasks does
  // them but without its atomic counters (two per task: 6% of a 200-id Adagrad step when
  // each of its 64 shards was a task).
  static void run_alone(Job& job) {
    size_t phase = 0;
    for (size_t task = 0; task < job.total; ++task) {
      while (task >= job.starts[phase + 1]) ++phase;
      try {
        (*job.fn)(phase, task - job.starts[phase]);
      } catch (...) {
        if (!job.error) job.error = std::current_exception();
        if (job.skip_after_error) break;
      }
    }
    if (job.error) std::rethrow_exception(job.error);
  }

  static void run_tasks(Job& job) {
    const size_t total = job.total;
    size_t phase = 0;
    for (;;) {
      const size_t task = job.next.fetch_add(1);
      if (task >= total) return;
      while (task >= job.starts[phase + 1]) ++phase;
      // Tasks are taken in order, so every task of the earlier phases has been taken.
      for (unsigned spins = 0; job.finished.load(std::memory_order_acquire) < job.starts[phase]; ++spins) {
        if (spins < 4096) spin_pause();
        else std::this_thread::yield();
      }
      if (!(job.skip_after_error && job.failed.load())) {
        try {
          (*job.fn)(phase, task - job.starts[phase]);
        } catch (...) {
          std::lock_guard<std::mutex> lk(job.error_mu);
          if (!job.error) job.error = std::current_exception();
          job.failed.store(true);
        }
      }
      job.finished.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  // In a forked child (pthread_atfork) the helper threads are not there: the child starts
  // with a pool of no helpers, so that its calls run on the calling thread, that
  // set_num_threads gives it helpers of its own, and that its exit does not wait forever to
  // join the parent's. Their thread objects are kept, never destroyed (destroying one still
  // joinable would end the process), and the locks and condition variables are made anew: a
  // helper or a call of the parent may have held one, or waited on one, at the fork.
  void forget_helpers() {
    static std::vector<std::thread>* const parents_helpers = new std::vector<std::thread>();
    for (std::thread& t : workers_) parents_helpers->push_back(std::move(t));
    workers_.clear();
    helpers_.store(0);
    new (&busy_) std::mutex();
    new (&mu_) std::mutex();
    new (&cv_) std::condition_variable();
    new (&done_cv_) std::condition_variable();
    job_ = nullptr;
    helpers_wanted_ = 0;
    stopping_ = false;
  }

  // If the system cannot start another thread, the count stays as it was (the helpers
  // started so far sleep, as those left over by a smaller count do) and the error is thrown.
  void resize(int n) {
    try {
      while (workers_.size() + 1 < static_cast<size_t>(n)) workers_.emplace_back([this] { worker_loop(); });
    } catch (...) {
      helpers_.store(static_cast<int>(workers_.size()));
      throw;
    }
    helpers_.store(static_cast<int>(workers_.size()));
    num_threads_.store(n);
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

  static bool& on_helper_flag() {
    static thread_local bool on_helper = false;
    return on_helper;
  }
  static bool& calling_flag() {
    static thread_local bool calling = false;
    return calling;
  }
  // Marks the calling thread as running the tasks of its call with helpers, until destroyed.
  struct Calling {
    Calling() { calling_flag() = true; }
    ~Calling() { calling_flag() = false; }
    Calling(const Calling&) = delete;
    Calling& operator=(const Calling&) = delete;
  };

  void worker_loop() {
    on_helper_flag() = true;
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      // Calls often come back to back (a lookup, then the update of the same ids): a helper
      // that spins a little before it sleeps is there at once for the next. Not longer: the
      // caller's own work between calls (a framework's threads) needs the core (design.md).
      spin_until([&] { return generation_.load(std::memory_order_relaxed) != seen; });
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stopping_ || (generation_ != seen && helpers_wanted_ > 0); });
        if (stopping_) return;
        seen = generation_;
        --helpers_wanted_;
        job = job_;
        ++job->joined;
      }
      run_tasks(*job);
      {
        std::lock_guard<std::mutex> lk(mu_);
        job->left.fetch_add(1, std::memory_order_acq_rel);
        done_cv_.notify_all();
      }
    }
  }

  std::atomic<int> num_threads_{1};
  std::atomic<int> helpers_{0};  // workers_.size(), for readers that do not hold busy_
  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the call that owns the helpers
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  Job* job_ = nullptr;
  size_t helpers_wanted_ = 0;
  std::atomic<uint64_t> generation_{0};
  bool stopping_ = false;
};

}  // namespace mtht
