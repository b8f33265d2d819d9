// A reader-writer lock for the shards of a table: uncontended, taking it and giving it back
// are one atomic operation each on one word, where std::shared_mutex (glibc's
// pthread_rwlock) does several: a write to a batch of 200 ids locks each of its shards twice,
// and with 64 shards the locks were a fifth of the write. A thread that cannot take the lock
// spins briefly, then sleeps on a condition variable until the holder gives it back. Like
// glibc's default, readers are never held back by waiting writers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace mtht::detail {

class SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void lock() {
    if (!try_lock()) wait_for([this] { return try_lock(); });
  }
  bool try_lock() {
    uint32_t s = state_.load(std::memory_order_relaxed);
    while (!(s & (kWriter | kReaders)))
      if (state_.compare_exchange_weak(s, s | kWriter, std::memory_order_acquire, std::memory_order_relaxed))
        return true;
    return false;
  }
  void unlock() {
    if (state_.exchange(0, std::memory_order_release) & kWaiting) wake();
  }

  void lock_shared() {
    if (!try_lock_shared()) wait_for([this] { return try_lock_shared(); });
  }
  bool try_lock_shared() {
    uint32_t s = state_.load(std::memory_order_relaxed);
    while (!(s & kWriter))
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire, std::memory_order_relaxed)) return true;
    return false;
  }
  void unlock_shared() {
    // The last reader out wakes the threads waiting (for a writer to get in).
    if (state_.fetch_sub(1, std::memory_order_release) == (kWaiting | 1)) wake();
  }

 private:
  static constexpr uint32_t kWriter = 1u << 31;
  static constexpr uint32_t kWaiting = 1u << 30;  // some thread sleeps (or is about to) on cv_
  static constexpr uint32_t kReaders = kWaiting - 1;

  // Spins for a few microseconds (shards are held that long for most writes), then sleeps
  // until a holder gives the lock back. Lost wake-ups cannot happen: a thread sets kWaiting
  // and tries once more while it holds mu_, and cv_.wait releases mu_ atomically; a holder
  // giving the lock back sees kWaiting (both change the one word) and takes mu_ to notify.
  template <class TryTake>
  void wait_for(TryTake try_take) {
    for (int i = 0; i < kSpins; ++i) {
      pause();
      if (try_take()) return;
    }
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      state_.fetch_or(kWaiting, std::memory_order_relaxed);
      if (try_take()) return;
      cv_.wait(lk);
    }
  }

  // Wakes every sleeper, each of which sets kWaiting again if it has to sleep again; so the
  // flag is cleared here, under mu_ (no thread is between setting it and sleeping), and
  // a lock that was contended once does not take mu_ at every unlock after.
  void wake() {
    std::lock_guard<std::mutex> lk(mu_);
    state_.fetch_and(~kWaiting, std::memory_order_relaxed);
    cv_.notify_all();
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  static constexpr int kSpins = 128;

  std::atomic<uint32_t> state_{0};  // kWriter | kWaiting | number of readers
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace mtht::detail
