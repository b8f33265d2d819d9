// Checks the shards' reader-writer lock (mtht/shared_mutex.h), printing one line per failure
// and "ok" when there is none: a writer is alone, readers share, and no thread that waits
// for the lock is left asleep once it is free (a lost wake-up would hang; a watchdog turns a
// hang into a failure). Threads hold the lock both briefly (waiters get it while spinning)
// and for milliseconds (waiters go to sleep and must be woken).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "mtht/shared_mutex.h"

namespace {

int failures = 0;

// `hold_us`: how long the threads of the failing case held the lock (-1: the sleepers case).
void expect(bool ok, const char* what, long hold_us) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s (holds of %ld us)\n", what, hold_us);
}

// Data a writer changes in two steps: a reader that got in while a writer held the lock
// would see the two differ.
struct Guarded {
  mtht::detail::SharedMutex mu;
  volatile long first = 0, second = 0;
  std::atomic<int> writers_in{0}, readers_in{0};
  std::atomic<bool> writer_met_someone{false}, reader_met_writer{false}, torn{false};
  std::atomic<int> most_readers{0};
};

void hold_for(std::chrono::microseconds us) {
  if (us.count() == 0) return;
  std::this_thread::sleep_for(us);
}

void write(Guarded& g, std::chrono::microseconds hold) {
  std::unique_lock<mtht::detail::SharedMutex> lk(g.mu);
  if (g.writers_in.fetch_add(1) != 0 || g.readers_in.load() != 0) g.writer_met_someone = true;
  g.first = g.first + 1;
  hold_for(hold);
  g.second = g.second + 1;
  g.writers_in.fetch_sub(1);
}

void read(Guarded& g, std::chrono::microseconds hold) {
  std::shared_lock<mtht::detail::SharedMutex> lk(g.mu);
  const int in = g.readers_in.fetch_add(1) + 1;
  int most = g.most_readers.load();
  while (in > most && !g.most_readers.compare_exchange_weak(most, in)) {
  }
  if (g.writers_in.load() != 0) g.reader_met_writer = true;
  const long a = g.first;
  hold_for(hold);
  if (g.second != a) g.torn = true;
  g.readers_in.fetch_sub(1);
}

// `threads` threads, each `rounds` times: a write every `write_every` rounds, else a read,
// holding the lock for `hold`. Returns the writes made.
long run(Guarded& g, int threads, int rounds, int write_every, std::chrono::microseconds hold) {
  std::vector<std::thread> pool;
  std::atomic<long> writes{0};
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r) {
        if ((r + t) % write_every == 0) {
          write(g, hold);
          ++writes;
        } else {
          read(g, hold);
        }
      }
    });
  for (auto& th : pool) th.join();
  return writes.load();
}

void check_round(int threads, int rounds, int write_every, std::chrono::microseconds hold, bool readers_overlap) {
  Guarded g;
  const long writes = run(g, threads, rounds, write_every, hold);
  const long us = static_cast<long>(hold.count());
  expect(!g.writer_met_someone.load(), "a writer holds the lock alone", us);
  expect(!g.reader_met_writer.load(), "no reader gets in while a writer holds the lock", us);
  expect(!g.torn.load(), "a reader never sees a write half-made", us);
  expect(g.first == writes && g.second == writes, "every write is made exactly once", us);
  if (readers_overlap) expect(g.most_readers.load() > 1, "readers hold the lock together", us);
  // Free again: a writer, then a reader, takes it at once.
  expect(g.mu.try_lock(), "the lock is free after the threads are done", us);
  g.mu.unlock();
  expect(g.mu.try_lock_shared(), "the lock is free for a reader after the threads are done", us);
  expect(!g.mu.try_lock(), "a writer cannot take the lock a reader holds", us);
  g.mu.unlock_shared();
}

// A writer waits (asleep, after its spins) for two readers who hold the lock for 20 ms; a
// reader waits for a writer the same way. Each must get the lock once it is given back.
void check_sleepers() {
  using namespace std::chrono;
  for (bool writer_holds : {false, true}) {
    mtht::detail::SharedMutex mu;
    std::atomic<bool> got{false};
    if (writer_holds) mu.lock();
    else mu.lock_shared(), mu.lock_shared();
    std::thread waiter([&] {
      if (writer_holds) {
        std::shared_lock<mtht::detail::SharedMutex> lk(mu);
        got = true;
      } else {
        std::unique_lock<mtht::detail::SharedMutex> lk(mu);
        got = true;
      }
    });
    std::this_thread::sleep_for(milliseconds(20));
    expect(!got.load(), writer_holds ? "a reader waits while a writer holds the lock"
                                     : "a writer waits while readers hold the lock", -1);
    if (writer_holds) {
      mu.unlock();
    } else {
      mu.unlock_shared();
      std::this_thread::sleep_for(milliseconds(5));
      expect(!got.load(), "a writer waits until the last reader is out", -1);
      mu.unlock_shared();
    }
    waiter.join();
    expect(got.load(), "a sleeping waiter gets the lock once it is given back", -1);
  }
}

// Waits up to a second for a thread's lock_draining to hold off new readers (a reader
// could then not get in, where only readers hold the lock).
bool draining_seen(mtht::detail::SharedMutex& mu) {
  for (int i = 0; i < 1000; ++i) {
    if (!mu.try_lock_shared()) return true;
    mu.unlock_shared();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// A writer that drains (a save) waits for the readers in, while new readers wait for it, so
// that readers whose holds overlap cannot keep it out; one that gives up lets them in.
void check_draining() {
  using namespace std::chrono;
  {
    mtht::detail::SharedMutex mu;
    std::atomic<int> order{0}, drained_at{0}, read_at{0};
    mu.lock_shared();
    std::thread drainer([&] {
      mu.lock_draining();
      drained_at = ++order;
      std::this_thread::sleep_for(milliseconds(10));
      mu.unlock();
    });
    expect(draining_seen(mu), "a draining writer holds off new readers", -1);
    std::thread reader([&] {
      std::shared_lock<mtht::detail::SharedMutex> lk(mu);
      read_at = ++order;
    });
    std::this_thread::sleep_for(milliseconds(20));
    expect(drained_at.load() == 0, "a draining writer waits for the reader in", -1);
    expect(read_at.load() == 0, "a new reader waits for a draining writer", -1);
    mu.unlock_shared();
    drainer.join();
    reader.join();
    expect(drained_at.load() == 1 && read_at.load() == 2, "the draining writer goes before the reader it held off", -1);
  }
  {
    mtht::detail::SharedMutex mu;
    std::atomic<bool> gave_up{false}, read{false};
    mu.lock_shared();
    std::thread drainer([&] { gave_up = !mu.try_lock_draining_until(steady_clock::now() + milliseconds(100)); });
    expect(draining_seen(mu), "a draining writer with a deadline holds off new readers", -1);
    std::thread reader([&] {
      std::shared_lock<mtht::detail::SharedMutex> lk(mu);
      read = true;
    });
    drainer.join();
    reader.join();  // returns only if the writer giving up let the reader in (the lock's reader stays)
    expect(gave_up.load(), "a draining writer gives up at its deadline while a reader holds on", -1);
    expect(read.load() && mu.try_lock_shared(), "readers get in once a draining writer gives up", -1);
    mu.unlock_shared();
    mu.unlock_shared();
    expect(mu.try_lock_draining_until(steady_clock::now()), "a draining writer takes a free lock", -1);
    mu.unlock();
  }
}

// Locks side by side sleep their waiters in the same place: a thread woken for the other
// lock must go back to sleep, and none may be left asleep. Four threads, two locks in one
// cache line, each thread writing under one of them and holding it for 300 us.
void check_neighbours() {
  struct Pair {
    mtht::detail::SharedMutex mu[2];
  } pair;
  static_assert(sizeof(Pair) <= 64, "the two locks share a cache line, so a place");
  long counts[2][2] = {{0, 0}, {0, 0}};  // per lock: before and after the hold
  std::atomic<int> inside[2] = {{0}, {0}};
  std::atomic<bool> overlap{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t)
    pool.emplace_back([&, t] {
      const int k = t % 2;
      for (int r = 0; r < 30; ++r) {
        std::unique_lock<mtht::detail::SharedMutex> lk(pair.mu[k]);
        if (inside[k].fetch_add(1) != 0) overlap = true;
        ++counts[k][0];
        std::this_thread::sleep_for(std::chrono::microseconds(300));
        ++counts[k][1];
        inside[k].fetch_sub(1);
      }
    });
  for (auto& th : pool) th.join();
  expect(!overlap.load(), "a writer holds its lock alone beside a lock that shares its place", 300);
  expect(counts[0][0] == 60 && counts[0][1] == 60 && counts[1][0] == 60 && counts[1][1] == 60,
         "every write under locks that share a place is made exactly once", 300);
}

}  // namespace

int main() {
  using namespace std::chrono;
  // A lost wake-up leaves a thread asleep forever: fail instead of hanging.
  std::thread([] {
    std::this_thread::sleep_for(seconds(240));
    std::printf("FAILED: a thread waiting for the lock was never woken (or the check ran 4 minutes)\n");
    std::fflush(stdout);
    std::_Exit(1);
  }).detach();

  check_sleepers();
  check_draining();
  check_neighbours();
  // Short holds: waiters mostly get the lock while spinning. Mostly reads, then mostly writes.
  check_round(4, 100000, 8, microseconds(0), false);
  check_round(4, 100000, 2, microseconds(0), false);
  // Holds of 100 us to 1 ms: waiters outlast their spins and sleep.
  check_round(4, 400, 4, microseconds(100), true);
  check_round(3, 40, 3, microseconds(1000), false);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
