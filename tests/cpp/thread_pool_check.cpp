// Checks the thread pool's contract, printing one line per failure and "ok" when there is
// none: every task runs exactly once; in parallel_phases no task starts before every task
// of the earlier phases has finished, and after a task throws the tasks not yet started are
// skipped; parallel_for runs every task even after one throws; a call made from inside a
// task (the helpers are busy) runs on its own thread, and the task knows it is in a shared
// call (in_shared_call) when its call has helpers; a call takes at most set_num_threads
// threads, however many helpers an earlier count made; a forked child's calls run, on its
// thread alone (usable_threads) until its set_num_threads gives it helpers, and its
// set_num_threads and its exit do not wait for the parent's helpers; MTHT_NUM_THREADS
// names the default count when it holds one.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "mtht/thread_pool.h"

// Clang says whether it builds with ThreadSanitizer through __has_feature; GCC defines
// __SANITIZE_THREAD__.
#if defined(__has_feature)
#define MTHT_HAS_THREAD_SANITIZER __has_feature(thread_sanitizer)
#else
#define MTHT_HAS_THREAD_SANITIZER 0
#endif

namespace {

int failures = 0;

void expect(bool ok, const char* what, int threads, int round) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s (threads %d, round %d)\n", what, threads, round);
}

void check_phases(mtht::ThreadPool& pool, int threads, int round) {
  const std::vector<size_t> sizes = {3, 0, 64, 1, 7};
  std::vector<std::atomic<int>> runs(75);
  std::vector<std::atomic<size_t>> finished(sizes.size());
  std::atomic<bool> early{false};
  size_t first = 0;
  std::vector<size_t> begin;
  for (size_t s : sizes) {
    begin.push_back(first);
    first += s;
  }
  pool.parallel_phases({3, 0, 64, 1, 7}, [&](size_t phase, size_t i) {
    for (size_t p = 0; p < phase; ++p)
      if (finished[p].load() != sizes[p]) early = true;
    ++runs[begin[phase] + i];
    finished[phase].fetch_add(1);
  });
  bool once = true;
  for (auto& r : runs) once = once && r.load() == 1;
  expect(once, "parallel_phases runs every task exactly once", threads, round);
  expect(!early, "parallel_phases starts a task only after the earlier phases", threads, round);
}

void check_errors(mtht::ThreadPool& pool, int threads, int round) {
  std::atomic<int> later{0};
  bool thrown = false;
  try {
    pool.parallel_phases({4, 16}, [&](size_t phase, size_t i) {
      if (phase == 0 && i == 2) throw std::runtime_error("task failed");
      if (phase == 1) ++later;
    });
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  expect(thrown, "parallel_phases rethrows a task's exception", threads, round);
  expect(later.load() == 0, "parallel_phases skips the phases after a failed task", threads, round);

  std::atomic<int> ran{0};
  thrown = false;
  try {
    pool.parallel_for(32, [&](size_t i) {
      ++ran;
      if (i == 5) throw std::runtime_error("task failed");
    });
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  expect(thrown, "parallel_for rethrows a task's exception", threads, round);
  expect(ran.load() == 32, "parallel_for runs every task after one throws", threads, round);
}

void check_nested(mtht::ThreadPool& pool, int threads, int round) {
  std::atomic<int> inner{0}, shared{0};
  pool.parallel_for(4, [&](size_t) {
    shared += mtht::ThreadPool::in_shared_call();
    pool.parallel_phases({2, 5}, [&](size_t, size_t) { ++inner; });
  });
  expect(inner.load() == 4 * 7, "a call from inside a task runs all its tasks", threads, round);
  expect(shared.load() == (threads > 1 ? 4 : 0), "a task is in a shared call when its call has helpers", threads,
         round);
  expect(!mtht::ThreadPool::in_shared_call(), "a thread is in no shared call once its call returns", threads, round);
}

// After set_num_threads(4) then (1) then (2), a call takes at most 2 threads (the helpers
// left over sleep), and every task still runs once.
void check_fewer_threads() {
  mtht::ThreadPool pool(4);
  for (int n : {1, 2, 3, 1, 2}) {
    pool.set_num_threads(n);
    for (int round = 0; round < 20; ++round) {
      std::mutex mu;
      std::vector<std::thread::id> seen;
      std::atomic<int> ran{0};
      pool.parallel_for(16, [&](size_t) {
        ++ran;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        std::lock_guard<std::mutex> lk(mu);
        if (std::find(seen.begin(), seen.end(), std::this_thread::get_id()) == seen.end())
          seen.push_back(std::this_thread::get_id());
      });
      expect(ran.load() == 16, "every task runs once after set_num_threads", n, round);
      expect(seen.size() <= static_cast<size_t>(n), "a call takes at most set_num_threads threads", n, round);
    }
  }
}

// The global pool with a helper, then a fork: the child runs calls, gives itself helpers
// and exits normally (destroying the pool); a child that has not exited within 30 s hung.
// Exit codes: 3 a call's tasks did not all run, 4 and 5 usable_threads was wrong.
[[maybe_unused]] void check_fork() {
  mtht::ThreadPool& pool = mtht::ThreadPool::global();
  pool.set_num_threads(2);
  std::atomic<int> ran{0};
  pool.parallel_for(64, [&](size_t) { ++ran; });
  expect(pool.usable_threads() == 2, "a pool of two threads can give a call two", 2, 0);
  const pid_t pid = fork();
  if (pid == 0) {
    // The child keeps the count it was given, but until it has helpers of its own a call
    // can have its thread alone.
    if (pool.num_threads() != 2 || pool.usable_threads() != 1) std::exit(4);
    std::atomic<int> in_child{0};
    pool.parallel_for(64, [&](size_t) { ++in_child; });
    pool.set_num_threads(2);
    if (pool.usable_threads() != 2) std::exit(5);
    pool.parallel_for(64, [&](size_t) { ++in_child; });
    std::exit(in_child.load() == 128 ? 0 : 3);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      expect(false, "a forked child exits without waiting for the parent's helpers", 2, 0);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a forked child runs its calls", 2, 0);
}

// MTHT_NUM_THREADS names the default count when it is a whole number from 1 to
// kMaxThreads in ASCII digits, beyond the cores too; named_threads() says -1 for any other
// value (which the package refuses at import) and the pool passes over it.
void check_named_default() {
  unsetenv("MTHT_NUM_THREADS");
  expect(mtht::ThreadPool::named_threads() == 0, "an unset MTHT_NUM_THREADS names nothing", 0, 0);
  const int detected = mtht::ThreadPool::default_threads();
  expect(detected >= 1 && detected <= 64, "the detected default is 1 to 64", detected, 0);
  const std::pair<const char*, int> cases[] = {
      {"5", 5},   {"1", 1},     {"1024", 1024}, {"007", 7},   {"", 0},      {"0", -1},
      {"1025", -1}, {"-3", -1}, {"+2", -1},     {" 2", -1},   {"2 ", -1},   {"4x", -1},
      {"x", -1},  {"99999999999999999999", -1}};
  for (const auto& [value, named] : cases) {
    setenv("MTHT_NUM_THREADS", value, 1);
    expect(mtht::ThreadPool::named_threads() == named, "named_threads() reads MTHT_NUM_THREADS", named, 0);
    const int want = named > 0 ? named : detected;
    expect(mtht::ThreadPool::default_threads() == want, "MTHT_NUM_THREADS sets the default", want, 0);
  }
  unsetenv("MTHT_NUM_THREADS");
}

}  // namespace

int main() {
  check_named_default();
  for (int threads : {1, 2, 4}) {
    mtht::ThreadPool pool(threads);
    for (int round = 0; round < 500; ++round) {
      check_phases(pool, threads, round);
      if (round % 10 == 0) {
        check_errors(pool, threads, round);
        check_nested(pool, threads, round);
      }
    }
  }
  check_fewer_threads();
  // ThreadSanitizer cannot follow a child forked while threads run that starts threads of
  // its own, so a build under it leaves the fork out (the other builds check it).
#if !defined(__SANITIZE_THREAD__) && !MTHT_HAS_THREAD_SANITIZER
  check_fork();
#endif
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
