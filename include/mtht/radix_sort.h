// Sorting records by a key of a few 64-bit words: a least-significant-digit radix sort, a
// byte per pass, that skips the bytes in which all records agree. A comparison sort of
// records whose order is random mispredicts a branch at about every other comparison.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace mtht::detail {

// Sorts v by (word(t, 0), word(t, 1), ..., word(t, kWords - 1)), unsigned; stable.
template <size_t kWords, class T, class Word>
void radix_sort(std::vector<T>& v, Word&& word) {
  const size_t n = v.size();
  if (n < 2) return;
  uint64_t differs[kWords] = {};
  for (const T& t : v)
    for (size_t w = 0; w < kWords; ++w) differs[w] |= word(t, w) ^ word(v[0], w);
  std::vector<T> scratch(n);
  T* from = v.data();
  T* to = scratch.data();
  for (size_t w = kWords; w-- > 0;)
    for (int shift = 0; shift < 64; shift += 8) {
      if (((differs[w] >> shift) & 0xFF) == 0) continue;
      size_t start[256] = {};
      for (size_t i = 0; i < n; ++i) ++start[(word(from[i], w) >> shift) & 0xFF];
      size_t sum = 0;
      for (size_t& c : start) sum += std::exchange(c, sum);
      for (size_t i = 0; i < n; ++i) to[start[(word(from[i], w) >> shift) & 0xFF]++] = from[i];
      std::swap(from, to);
    }
  if (from != v.data()) v.swap(scratch);
}

}  // namespace mtht::detail
