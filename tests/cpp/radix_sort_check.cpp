// Checks the radix sort against std::stable_sort on records of three 64-bit key words:
// random words, words that agree in all but a few bytes (the sort skips the bytes that
// never differ), all-equal keys, and sizes from 0 up. Prints one line per failure and "ok"
// when there is none.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mtht/radix_sort.h"

namespace {

struct Record {
  uint64_t key[3];
  size_t position;  // in the input: equal keys must keep their order
};

int failures = 0;

void check(int round, size_t n, uint64_t masks[3]) {
  uint64_t x = 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(round + 1);
  auto next = [&] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  std::vector<Record> records(n);
  for (size_t i = 0; i < n; ++i) {
    for (int w = 0; w < 3; ++w) records[i].key[w] = next() & masks[w];
    records[i].position = i;
  }
  std::vector<Record> expected = records;
  std::stable_sort(expected.begin(), expected.end(), [](const Record& a, const Record& b) {
    return std::lexicographical_compare(a.key, a.key + 3, b.key, b.key + 3);
  });
  mtht::detail::radix_sort<3>(records, [](const Record& r, size_t w) { return r.key[w]; });
  for (size_t i = 0; i < n; ++i)
    if (records[i].position != expected[i].position) {
      if (++failures < 20) std::printf("FAILED: round %d, %zu records: position %zu differs\n", round, n, i);
      return;
    }
}

}  // namespace

int main() {
  const uint64_t all = ~uint64_t{0};
  uint64_t masks[][3] = {
      {all, all, all},                     // every byte differs
      {0xFF, 0, all},                      // one byte of the first word, none of the second
      {0x0F0000, 0xFF00000000000000, 0x3},  // a few bits here and there: few distinct keys
      {0, 0, 0},                           // all keys equal: the input order stays
      {1, 1, 1},
  };
  int round = 0;
  for (auto& m : masks)
    for (size_t n : {0, 1, 2, 3, 17, 256, 1000, 65537}) check(round++, n, m);
  // Two bits of one byte in each word, for every byte: each pass decides the order alone.
  for (int byte = 0; byte < 8; ++byte) {
    const uint64_t bits = uint64_t{3} << (8 * byte);
    uint64_t m[3] = {bits, bits, bits};
    check(round++, 1000, m);
  }
  std::puts(failures ? "failed" : "ok");
  return failures ? 1 : 0;
}
