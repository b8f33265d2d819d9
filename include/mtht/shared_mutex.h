// A reader-writer lock for the shards of a table: one 32-bit word. Uncontended, taking it
// and giving it back are one atomic operation each, where std::shared_mutex (glibc's
// pthread_rwlock) does several: a write to a batch of 200 ids locks each of its shards twice,
// and with 64 shards the locks were a fifth of the write. A thread that cannot take the lock
// spins briefly, then sleeps on one of a fixed set of condition variables shared by all
// locks (picked by the lock's address), until the holder gives the lock back. So a shard's
// lock shares a cache line with the fields a batch reads next. Like glibc's default,
// readers are never held back by waiting writers, except by one that asks for it
// (lock_draining: a save, which readers that come one after another would never let in).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <new>

#include "mtht/spin_pause.h"

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

  // lock(), holding off new readers while it waits for those under way: several threads
  // whose shared holds overlap would otherwise keep it out for as long as they go on.
  void lock_draining() { try_lock_draining_until(std::chrono::steady_clock::time_point::max()); }
  // lock_draining(), giving up at `deadline` (false: not taken, and new readers let in again).
  bool try_lock_draining_until(std::chrono::steady_clock::time_point deadline) {
    // Set again at each try: another writer's unlock (or a drainer giving up) clears it.
    auto take = [this] {
      state_.fetch_or(kDraining, std::memory_order_relaxed);
      uint32_t s = state_.load(std::memory_order_relaxed);
      while (!(s & (kWriter | kReaders)))
        if (state_.compare_exchange_weak(s, (s & ~kDraining) | kWriter, std::memory_order_acquire,
                                         std::memory_order_relaxed))
          return true;
      return false;
    };
    if (wait_until(take, deadline)) return true;
    // The readers held off sleep (kWaiting): let them in.
    if (state_.fetch_and(~kDraining, std::memory_order_relaxed) & kWaiting) wake();
    return false;
  }

  // Makes the lock free. Only for a lock that its holder can no longer give back: in the
  // child of a fork, a lock the parent's other threads held.
  void reset() { state_.store(0, std::memory_order_release); }
  // In the child of a fork, where no thread waits: the places where threads wait made anew
  // (a thread of the parent may have held a place's mutex at the fork).
  static void reset_waiting() {
    for (size_t k = 0; k < kPlaces; ++k) {
      Place& p = places()[k];
      new (&p.mu) std::mutex();
      new (&p.cv) std::condition_variable();
    }
  }

  void lock_shared() {
    if (!try_lock_shared()) wait_for([this] { return try_lock_shared(); });
  }
  bool try_lock_shared() {
    uint32_t s = state_.load(std::memory_order_relaxed);
    while (!(s & (kWriter | kDraining)))
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire, std::memory_order_relaxed)) return true;
    return false;
  }
  void unlock_shared() {
    // The last reader out wakes the threads waiting (for a writer to get in).
    const uint32_t s = state_.fetch_sub(1, std::memory_order_release);
    if ((s & kReaders) == 1 && (s & kWaiting)) wake();
  }

 private:
  static constexpr uint32_t kWriter = 1u << 31;
  static constexpr uint32_t kWaiting = 1u << 30;  // some thread sleeps (or is about to) on this lock
  static constexpr uint32_t kDraining = 1u << 29;  // a writer waits, and new readers wait for it
  static constexpr uint32_t kReaders = kDraining - 1;

  // Where the threads waiting for a lock sleep: one of kPlaces, by the lock's address.
  struct Place {
    std::mutex mu;
    std::condition_variable cv;
  };
  static constexpr size_t kPlaces = 64;
  static Place* places() {
    // Never destroyed: a thread may still wait on a lock while the process exits (a daemon
    // thread of the interpreter, in a call that released the GIL).
    static Place* all = new Place[kPlaces];
    return all;
  }
  Place& place() const { return places()[(reinterpret_cast<uintptr_t>(this) >> 6) % kPlaces]; }

  // Spins for a few microseconds (shards are held that long for most writes), then sleeps
  // until a holder gives the lock back. Lost wake-ups cannot happen: a thread sets kWaiting
  // and tries once more while it holds its place's mutex, and the condition variable
  // releases that mutex atomically as it sleeps; a holder giving the lock back sees
  // kWaiting (both change the one word) and takes the same mutex to notify.
  template <class TryTake>
  void wait_for(TryTake try_take) {
    wait_until(try_take, std::chrono::steady_clock::time_point::max());
  }
  // wait_for, giving up at `deadline` (false).
  template <class TryTake>
  bool wait_until(TryTake try_take, std::chrono::steady_clock::time_point deadline) {
    for (int i = 0; i < kSpins; ++i) {
      spin_pause();
      if (try_take()) return true;
    }
    Place& p = place();
    std::unique_lock<std::mutex> lk(p.mu);
    for (;;) {
      state_.fetch_or(kWaiting, std::memory_order_relaxed);
      if (try_take()) return true;
      if (deadline == std::chrono::steady_clock::time_point::max())
        p.cv.wait(lk);
      else if (p.cv.wait_until(lk, deadline) == std::cv_status::timeout)
        return try_take();
    }
  }

  // Wakes every thread asleep on this lock's place (those waiting for other locks of the
  // place wake too, find theirs still taken and sleep again). Each sets kWaiting again
  // before it sleeps again, so the flag is cleared here, under the place's mutex (no thread
  // is between setting it and sleeping): a lock that was contended once does not take the
  // mutex at every unlock after.
  void wake() {
    Place& p = place();
    std::lock_guard<std::mutex> lk(p.mu);
    state_.fetch_and(~kWaiting, std::memory_order_relaxed);
    p.cv.notify_all();
  }

  static constexpr int kSpins = 128;

  std::atomic<uint32_t> state_{0};  // kWriter | kWaiting | kDraining | number of readers
};

}  // namespace mtht::detail
