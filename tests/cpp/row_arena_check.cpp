// Checks RowArena::for_each_in_column against RowArena::at: for arenas of two columns with
// 0 to 2,000 rows in use (rows spread over chunks of 16, 32, 64, ... rows) and steps from 1
// up, the walk visits rows 0, step, 2 * step, ... below the rows in use, in order, each with
// its address. Then room for more rows in an arena of two columns, with operator new made
// to fail at each of its allocations in turn: a reservation that fails keeps the chunks it
// added whole (in both columns) and adds no other, so the arena then takes room again and
// its rows hold what is written to each column of each. Prints one line per failure and
// "ok" when there is none.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "mtht/shard.h"
#include "failing_new.h"

namespace {

int failures = 0;

void check(uint32_t used, uint64_t step, size_t column) {
  mtht::detail::RowArena rows(std::vector<size_t>{48, 16}, 8);
  for (uint32_t r = 0; r < used; ++r) rows.allocate();
  std::vector<std::pair<uint32_t, const char*>> expected, seen;
  for (uint64_t r = 0; r < used; r += step)
    expected.emplace_back(static_cast<uint32_t>(r), rows.at(column, static_cast<uint32_t>(r)));
  rows.for_each_in_column(column, step, [&](uint32_t r, const char* at) { seen.emplace_back(r, at); });
  if (seen != expected && ++failures < 20)
    std::printf("FAILED: %u rows, step %llu, column %zu: %zu rows visited, %zu expected\n", used,
                static_cast<unsigned long long>(step), column, seen.size(), expected.size());
}

// Room for 5,000 rows after 100, the c-th allocation failing; then the rows, each column of
// each written with its row number and read back.
bool check_failed_reservation(long c) {
  mtht::detail::RowArena rows(std::vector<size_t>{48, 16}, 8);
  for (uint32_t r = 0; r < 100; ++r) rows.allocate();
  const uint64_t capacity = rows.capacity();
  bool failed = false;
  allocations_left = c;
  try {
    rows.reserve(5000);
  } catch (const std::bad_alloc&) {
    failed = true;
  }
  allocations_left = -1;
  if (failed && (rows.capacity() < capacity || rows.capacity() >= 5000) && ++failures < 20)
    std::printf("FAILED: allocation %ld failed, and the capacity went from %llu to %llu\n", c,
                static_cast<unsigned long long>(capacity), static_cast<unsigned long long>(rows.capacity()));
  rows.reserve(5000);
  while (rows.rows_used() < 5000) rows.allocate();
  for (uint32_t r = 0; r < 5000; ++r)
    for (size_t column : {0, 1}) std::memcpy(rows.at(column, r), &r, sizeof r);
  for (uint32_t r = 0; r < 5000; ++r)
    for (size_t column : {0, 1}) {
      uint32_t got;
      std::memcpy(&got, rows.at(column, r), sizeof got);
      if (got != r && ++failures < 20)
        std::printf("FAILED: allocation %ld failed; then row %u of column %zu reads %u\n", c, r, column, got);
    }
  return failed;
}

}  // namespace

int main() {
  for (long c = 0; check_failed_reservation(c); ++c) {
  }
  for (uint32_t used : {0u, 1u, 15u, 16u, 17u, 47u, 48u, 49u, 100u, 1000u, 2000u})
    for (uint64_t step : {1ull, 2ull, 3ull, 16ull, 17ull, 100ull, 5000ull})
      for (size_t column : {0, 1}) check(used, step, column);
  std::puts(failures ? "failed" : "ok");
  return failures ? 1 : 0;
}
