// The machine's random-access ceiling: independent random 64-byte reads over a buffer of a
// given size, on one or more threads. The benchmark divides table throughput by it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "mtht/buffer.h"

namespace mtht {

struct ProbeResult {
  double reads_per_s = 0;  // all threads together
  uint64_t checksum = 0;   // keeps the reads from being optimised away
};

inline ProbeResult random_read_probe(size_t buffer_bytes, size_t reads_per_thread, int threads) {
  const size_t lines = buffer_bytes / 64 > 0 ? buffer_bytes / 64 : 1;
  Buffer buf(lines * 64);
  std::memset(buf.data(), 1, lines * 64);  // touch every page: reads must reach memory
  const unsigned char* base = static_cast<const unsigned char*>(buf.data());
  std::vector<uint64_t> sums(static_cast<size_t>(threads), 0);
  auto work = [&](int t) {
    uint64_t x = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(t + 1), s = 0;
    for (size_t i = 0; i < reads_per_thread; ++i) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      s += base[(x % lines) * 64];  // addresses do not depend on loaded data: reads overlap
    }
    sums[static_cast<size_t>(t)] = s;
  };
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ProbeResult r;
  r.reads_per_s = static_cast<double>(reads_per_thread) * threads / seconds;
  for (uint64_t s : sums) r.checksum += s;
  return r;
}

}  // namespace mtht
