// What keeps a fork of the process from leaving a table's locks held in the child.
#pragma once

#include <pthread.h>

#include <mutex>
#include <new>
#include <set>
#include <shared_mutex>

#include "mtht/buffer.h"
#include "mtht/scratch_memory.h"
#include "mtht/shared_mutex.h"

namespace mtht {

namespace detail {

// The tables' write gates, which a fork's child frees: a save holds them between calls
// (EmbeddingTable::hold_writes), and no thread of the child gives them back. In the child no
// write holds one (a fork waits for the calls under way: ForkGate, whose handlers are
// registered after these, so that its prepare runs first).
class ForkFreedLocks {
 public:
  static ForkFreedLocks& global() {
    static ForkFreedLocks* g = make();  // never destroyed: tables may outlive statics
    return *g;
  }
  void add(SharedMutex* m) {
    std::lock_guard<std::mutex> l(mu_);
    locks_.insert(m);
  }
  void remove(SharedMutex* m) {
    std::lock_guard<std::mutex> l(mu_);
    locks_.erase(m);
  }

 private:
  static ForkFreedLocks* make() {
    auto* g = new ForkFreedLocks();
    pthread_atfork([] { global().mu_.lock(); }, [] { global().mu_.unlock(); }, [] {
      for (SharedMutex* m : global().locks_) m->reset();
      SharedMutex::reset_waiting();  // a thread waiting on a gate may have held a place's mutex
      global().mu_.unlock();
    });
    return g;
  }
  std::mutex mu_;
  std::set<SharedMutex*> locks_;
};

// A fork while another thread is inside a call on a table would leave the locks that call
// holds (a shard's, the layout, a capacity limit's) held in the child, which would then
// wait on them forever at its first call on that table. Every call from outside the core
// holds this gate shared (InCall); a fork takes it alone first, so it waits until the calls
// under way are done, and gives it back on both sides. No new call can start meanwhile: the
// forking thread holds the interpreter's lock, which a call needs to begin. A call's pool
// helpers may still take it shared while the fork waits (readers go first), and must: the
// call waits for them.
class ForkGate {
 public:
  class InCall {
   public:
    InCall() {
      if (depth()++ == 0) gate().lock_shared();
    }
    ~InCall() {
      if (--depth() == 0) gate().unlock_shared();
    }
    InCall(const InCall&) = delete;
    InCall& operator=(const InCall&) = delete;
  };

 private:
  static int& depth() {
    static thread_local int calls = 0;  // calls this thread is inside of
    return calls;
  }
  static std::shared_mutex& gate() {
    static std::shared_mutex* g = make();  // never destroyed, like the pools
    return *g;
  }
  // Prepare handlers run in the reverse order of their registration: the memory pools'
  // handlers are registered first, so that this one, run before theirs, waits for calls
  // that may still need a pool's lock.
  static std::shared_mutex* make() {
    HugeBlockPool::global();
    ScratchMemory::global();
    ForkFreedLocks::global();  // its prepare handler after this one's: calls may free tables
    auto* g = new std::shared_mutex();
    // In the child the gate is made anew rather than unlocked: a rwlock records its writer
    // by thread id, and the child's one thread has another.
    pthread_atfork([] { gate().lock(); }, [] { gate().unlock(); }, [] { new (&gate()) std::shared_mutex(); });
    return g;
  }
};

}  // namespace detail
}  // namespace mtht
