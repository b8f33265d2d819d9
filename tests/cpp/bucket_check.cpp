// Checks a bucket's packed fields and its id comparison: the overflow count kept in the top
// bits of the 4 slot words reads back what was set, leaves the row numbers alone, counts up
// to kMaxOverflow and stays there; Shard::matches (four ids and four row words at a time
// with SSE2) agrees with a slot-by-slot comparison, for ids that differ from the one wanted
// in only their low or their high 32 bits, in slots free or taken, with any overflow bits.
// Prints one line per failure and "ok" when there is none.
#include <cstdint>
#include <cstdio>
#include <random>

#include "mtht/shard.h"

namespace {

using mtht::detail::Bucket;
using mtht::detail::kBucketSlots;
using mtht::detail::kMaxOverflow;
using mtht::detail::kRowMask;

int failures = 0;

void fail(const char* what, unsigned long long a, unsigned long long b) {
  if (++failures < 20) std::printf("FAILED: %s: %llu, expected %llu\n", what, a, b);
}

void check_overflow(std::mt19937_64& rng) {
  for (uint32_t v : {0u, 1u, 15u, 16u, 255u, 256u, 4095u, 4096u, 0x1234u, 65534u, 65535u}) {
    Bucket b{};
    uint32_t rows[kBucketSlots];
    for (int j = 0; j < kBucketSlots; ++j) b.set_row_plus_one(j, rows[j] = static_cast<uint32_t>(rng()) & kRowMask);
    b.set_overflow(v);
    if (b.overflow() != v) fail("overflow read back", b.overflow(), v);
    if (b.overflowed() != (v != 0)) fail("overflowed", b.overflowed(), v != 0);
    for (int j = 0; j < kBucketSlots; ++j)
      if (b.row_plus_one(j) != rows[j]) fail("row beside the overflow count", b.row_plus_one(j), rows[j]);
    b.set_row_plus_one(1, 7);
    if (b.overflow() != v) fail("overflow after a row is set", b.overflow(), v);
    b.add_overflow();
    const uint32_t up = v < kMaxOverflow ? v + 1 : kMaxOverflow;
    if (b.overflow() != up) fail("one more overflow", b.overflow(), up);
    b.drop_overflow();
    const uint32_t down = up < kMaxOverflow ? up - 1 : kMaxOverflow;  // a full count stays full
    if (b.overflow() != down) fail("one overflow less", b.overflow(), down);
  }
}

void check_matches(std::mt19937_64& rng) {
  for (int round = 0; round < 200000; ++round) {
    const int64_t id = static_cast<int64_t>(rng());
    const int64_t near[] = {id, id ^ 1, id ^ (int64_t{1} << 32), id ^ INT64_MIN, ~id, static_cast<int64_t>(rng())};
    Bucket b{};
    unsigned expected = 0;
    for (int j = 0; j < kBucketSlots; ++j) {
      b.key[j] = near[rng() % 6];
      b.set_row_plus_one(j, rng() % 3 == 0 ? 0 : static_cast<uint32_t>(rng()) & kRowMask);
      expected |= static_cast<unsigned>(b.key[j] == id && b.taken(j)) << j;
    }
    b.set_overflow(static_cast<uint32_t>(rng()) & kMaxOverflow);
    const unsigned got = mtht::detail::Shard::matches(b, id);
    if (got != expected) fail("matches", got, expected);
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  check_overflow(rng);
  check_matches(rng);
  std::puts(failures ? "failed" : "ok");
  return failures ? 1 : 0;
}
