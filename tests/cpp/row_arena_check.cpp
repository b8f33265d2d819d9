// Checks RowArena::for_each_in_column against RowArena::at: for arenas of two columns with
// 0 to 2,000 rows in use (rows spread over chunks of 16, 32, 64, ... rows) and steps from 1
// up, the walk visits rows 0, step, 2 * step, ... below the rows in use, in order, each with
// its address. Prints one line per failure and "ok" when there is none.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mtht/table.h"

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

}  // namespace

int main() {
  for (uint32_t used : {0u, 1u, 15u, 16u, 17u, 47u, 48u, 49u, 100u, 1000u, 2000u})
    for (uint64_t step : {1ull, 2ull, 3ull, 16ull, 17ull, 100ull, 5000ull})
      for (size_t column : {0, 1}) check(used, step, column);
  std::puts(failures ? "failed" : "ok");
  return failures ? 1 : 0;
}
