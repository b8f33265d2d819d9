// Checks route_ids, sum_rows_to and gather_rows_from (route.h) against a model built from
// std::map over random batches: ids from small ranges (many duplicates), negative ones and
// the extremes of int64, world sizes 1 to 5, with and without dedup; then larger batches of
// ids that seldom repeat, whose hash table outgrows the cache (calls of every size reuse
// one thread's memory, which it gives back after a very large one); and several tables
// routed, and their rows gathered back, in one call. Prints one line per
// failure and "ok" when there is none.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <vector>

#include "mtht/route.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int round) {
  if (ok) return;
  ++failures;
  if (failures < 20) std::printf("FAILED: %s (round %d)\n", what, round);
}

uint64_t next(uint64_t& x) {
  x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  return x >> 33;
}

// `wide`: up to `most` ids from a range of 100,000 (few repeats); otherwise up to 300 from
// a range of 61 and the extremes.
void check_round(int round, bool wide, size_t most = 40000) {
  uint64_t x = 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(round + 1);
  const int64_t world = 1 + static_cast<int64_t>(next(x) % 5);
  const bool dedup = round % 2 == 0;
  const size_t n = next(x) % (wide ? most : 300);
  std::vector<int64_t> ids(n);
  for (auto& id : ids) {
    const uint64_t pick = next(x) % 20;
    if (pick == 0) id = std::numeric_limits<int64_t>::min();
    else if (pick == 1) id = std::numeric_limits<int64_t>::max();
    else if (wide) id = static_cast<int64_t>(next(x) % 100000) - 50000;
    else id = static_cast<int64_t>(next(x) % 61) - 30;
  }
  std::vector<int64_t> sent(n), counts(static_cast<size_t>(world)), position(n);
  const size_t m = mtht::route_ids(ids.data(), n, world, dedup, sent.data(), counts.data(), position.data());
  sent.resize(m);
  // The model: the ids (distinct ones in order of first occurrence with dedup), grouped by owner.
  std::vector<int64_t> order;
  std::map<int64_t, size_t> first;
  for (int64_t id : ids)
    if (!dedup || first.emplace(id, order.size()).second) order.push_back(id);
  std::vector<int64_t> expected;
  for (int64_t w = 0; w < world; ++w) {
    int64_t count = 0;
    for (int64_t id : order) {
      const int64_t owner = ((id % world) + world) % world;
      if (owner == w) expected.push_back(id), ++count;
    }
    expect(counts[static_cast<size_t>(w)] == count, "count per owner", round);
  }
  expect(sent == expected, "sent ids grouped by owner, in order", round);
  std::vector<bool> used(m, false);
  for (size_t i = 0; i < n; ++i) {
    const size_t p = static_cast<size_t>(position[i]);
    expect(p < m && sent[p] == ids[i], "position points at the id", round);
    if (!dedup) expect(p < m && !used[p], "without dedup each id has its own place", round);
    if (p < m) used[p] = true;
  }
  // Rows: row i = i + 1 in each of 3 columns; sums left to right in float.
  const size_t dim = 3;
  std::vector<float> rows(n * dim), summed(m * dim);
  for (size_t i = 0; i < n * dim; ++i) rows[i] = static_cast<float>(i / dim + 1) * (i % dim == 1 ? 0.1f : 1.0f);
  const bool finite = m ? mtht::sum_rows_to(rows.data(), n, dim, position.data(), m, summed.data()) : true;
  expect(finite, "small sums are finite", round);
  std::vector<float> model(m * dim, 0.0f);
  std::vector<bool> started(m, false);
  for (size_t i = 0; i < n; ++i) {
    const size_t p = static_cast<size_t>(position[i]);
    for (size_t j = 0; j < dim; ++j)
      model[p * dim + j] = started[p] ? model[p * dim + j] + rows[i * dim + j] : rows[i * dim + j];
    started[p] = true;
  }
  expect(summed == model, "rows summed per id left to right", round);
  // Gather back: the rows of each owner's sent ids as a block, the blocks in reverse owner
  // order with a gap of one row before each.
  std::vector<int64_t> block_start(static_cast<size_t>(world));
  std::vector<float> flat;
  size_t owner_first = m;  // the first sent id of the owner being placed, counting down
  for (int64_t w = world - 1; w >= 0; --w) {
    owner_first -= static_cast<size_t>(counts[static_cast<size_t>(w)]);
    flat.insert(flat.end(), dim, -1.0f);  // the gap
    block_start[static_cast<size_t>(w)] = static_cast<int64_t>(flat.size());
    for (int64_t j = 0; j < counts[static_cast<size_t>(w)]; ++j)
      for (size_t c = 0; c < dim; ++c) flat.push_back(static_cast<float>(sent[owner_first + j] % 1000) + c);
  }
  std::vector<float> out(n * dim);
  if (n)
    mtht::gather_rows_from(flat.data(), flat.size(), dim, block_start.data(), counts.data(),
                           static_cast<size_t>(world), position.data(), n, out.data());
  bool same = true;
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < dim; ++j) same = same && out[i * dim + j] == static_cast<float>(ids[i] % 1000) + j;
  expect(same, "rows gathered back in the order of the ids", round);
}

// route_tables and gather_tables give each table what route_ids and gather_rows_from give
// it alone: tables of 0 to 40 ids, some deduplicated, rows of 1 to 3 floats.
void check_tables(int round) {
  uint64_t x = 0x2545f4914f6cdd1dULL * static_cast<uint64_t>(round + 1);
  const int64_t world = 1 + static_cast<int64_t>(next(x) % 4);
  const size_t k = 1 + next(x) % 5;
  std::vector<std::vector<int64_t>> ids(k);
  std::vector<size_t> n(k), dims(k);
  std::vector<uint8_t> dedup(k);
  std::vector<const int64_t*> id_of(k);
  size_t total = 0;
  for (size_t t = 0; t < k; ++t) {
    ids[t].resize(next(x) % 41);
    for (auto& id : ids[t]) id = static_cast<int64_t>(next(x) % 31) - 15;
    n[t] = ids[t].size();
    dims[t] = 1 + next(x) % 3;
    dedup[t] = next(x) % 2;
    id_of[t] = ids[t].data();
    total += n[t];
  }
  std::vector<int64_t> sent(total), position(total), counts(static_cast<size_t>(world) * k), sent_of(k);
  mtht::route_tables(id_of.data(), n.data(), dedup.data(), k, world, sent.data(), position.data(), counts.data(),
                     sent_of.data());
  // The rows that come back: owner w's block of table t is filled with t * 100 + w + the sent id.
  std::vector<float> flat;
  std::vector<int64_t> block_start(k * static_cast<size_t>(world)), counts_by_table(block_start.size());
  std::vector<std::vector<float>> outs(k);
  std::vector<float*> out_of(k);
  std::vector<const int64_t*> position_of(k);
  size_t first = 0;
  for (size_t t = 0; t < k; ++t) {
    std::vector<int64_t> alone_sent(n[t]), alone_counts(static_cast<size_t>(world)), alone_position(n[t]);
    const size_t m = mtht::route_ids(ids[t].data(), n[t], world, dedup[t] != 0, alone_sent.data(),
                                     alone_counts.data(), alone_position.data());
    expect(static_cast<size_t>(sent_of[t]) == m, "route_tables: as many sent as alone", round);
    expect(std::equal(alone_sent.begin(), alone_sent.begin() + m, sent.begin() + first),
           "route_tables: the ids sent as alone", round);
    expect(std::equal(alone_position.begin(), alone_position.end(), position.begin() + first),
           "route_tables: the positions as alone", round);
    size_t sent_before = 0;
    for (int64_t w = 0; w < world; ++w) {
      const int64_t c = counts[static_cast<size_t>(w) * k + t];
      expect(c == alone_counts[static_cast<size_t>(w)], "route_tables: the counts as alone", round);
      block_start[t * world + w] = static_cast<int64_t>(flat.size());
      counts_by_table[t * world + w] = c;
      for (int64_t j = 0; j < c; ++j)
        for (size_t d = 0; d < dims[t]; ++d)
          flat.push_back(static_cast<float>(t * 100 + w) + static_cast<float>(sent[first + sent_before + j]));
      sent_before += static_cast<size_t>(c);
    }
    outs[t].assign(n[t] * dims[t], -1.0f);
    out_of[t] = outs[t].data();
    position_of[t] = position.data() + first;
    first += n[t];
  }
  mtht::gather_tables(flat.data(), flat.size(), dims.data(), block_start.data(), counts_by_table.data(),
                      static_cast<size_t>(world), position_of.data(), n.data(), k, out_of.data());
  for (size_t t = 0; t < k; ++t)
    for (size_t i = 0; i < n[t]; ++i) {
      const int64_t owner = ((ids[t][i] % world) + world) % world;
      for (size_t d = 0; d < dims[t]; ++d)
        expect(outs[t][i * dims[t] + d] == static_cast<float>(t * 100 + owner) + static_cast<float>(ids[t][i]),
               "gather_tables: each table's rows back in the order of its ids", round);
    }
}

}  // namespace

int main() {
  for (int round = 0; round < 2000; ++round) check_round(round, false);
  for (int round = 2000; round < 2030; ++round) check_round(round, true);
  // A batch large enough that the thread gives its memory back after it, then small ones.
  check_round(2030, true, 2000000);
  for (int round = 2031; round < 2040; ++round) check_round(round, round % 3 == 0);
  for (int round = 0; round < 500; ++round) check_tables(round);
  // Bad arguments throw instead of reading out of bounds.
  int64_t id = 1, sent = 0, count = 0, position = 5;
  bool threw = false;
  try {
    mtht::route_ids(&id, 1, 0, true, &sent, &count, &position);
  } catch (const mtht::ValueError&) {
    threw = true;
  }
  expect(threw, "world 0 refused", -1);
  float row = 1, out = 0;
  threw = false;
  try {
    mtht::sum_rows_to(&row, 1, 1, &position, 1, &out);
  } catch (const mtht::ValueError&) {
    threw = true;
  }
  expect(threw, "a position past the rows refused", -1);
  for (int64_t at : {int64_t{-1}, int64_t{-4194304}, int64_t{1}}) {  // before the rows, or past their end
    const int64_t zero = 0, one = 1;
    float flat[1] = {0}, gathered = 0;
    threw = false;
    try {
      mtht::gather_rows_from(flat, 1, 1, &at, &one, 1, &zero, 1, &gathered);
    } catch (const mtht::ValueError&) {
      threw = true;
    }
    expect(threw, "a block outside the rows refused", -1);
  }
  float big[2] = {3e38f, 3e38f}, sum = 0;
  const int64_t twice[2] = {0, 0};
  expect(!mtht::sum_rows_to(big, 2, 1, twice, 1, &sum), "a sum past the float range reported", -1);
  // A NaN or an Inf in any row and column of many is reported; none, not.
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(), 1.0f}) {
    std::vector<float> rows(37 * 5, 0.5f), sums(37 * 5);
    std::vector<int64_t> spread(37);
    for (size_t i = 0; i < spread.size(); ++i) spread[i] = static_cast<int64_t>(i);
    rows[23 * 5 + 3] = bad;
    expect(mtht::sum_rows_to(rows.data(), 37, 5, spread.data(), 37, sums.data()) == (bad == 1.0f),
           "a NaN or Inf among the sums reported", -1);
  }
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
