// Routing a batch of ids to the processes that own them (a table sharded over `world`
// processes, id mod world owning): the ids each process is sent, grouped by owner, each
// once or as given; the rows sent with them (summed per id); and the rows that come back,
// put in the order of the ids given.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mtht/errors.h"
#include "mtht/hash.h"

namespace mtht {

// The owner of an id: its modulo `world`, non-negative.
inline int64_t owner_of(int64_t id, int64_t world) {
  const int64_t r = id % world;
  return r < 0 ? r + world : r;
}

// Routes ids[0, n) to `world` owners; with `dedup`, each distinct id is sent once. Writes
// `sent` (room for n ids: grouped by owner, per owner in order of first occurrence),
// `counts` (world: how many of `sent` each owner gets) and `position` (n: the place in
// `sent` of each id given); returns how many ids are sent.
inline size_t route_ids(const int64_t* ids, size_t n, int64_t world, bool dedup, int64_t* sent, int64_t* counts,
                        int64_t* position) {
  if (world < 1) throw ValueError("world size must be at least 1, got " + std::to_string(world));
  // distinct[u]: the u-th distinct id (the u-th id without dedup); position[i] holds ids[i]'s
  // u until the ids are placed.
  std::vector<int64_t> distinct;
  if (dedup) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    std::vector<int64_t> keys(cap);
    std::vector<int64_t> index(cap, -1);  // into distinct; -1: empty
    const size_t mask = cap - 1;
    distinct.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      size_t s = static_cast<size_t>(hash_id(ids[i])) & mask;
      while (index[s] >= 0 && keys[s] != ids[i]) s = (s + 1) & mask;
      if (index[s] < 0) {
        keys[s] = ids[i];
        index[s] = static_cast<int64_t>(distinct.size());
        distinct.push_back(ids[i]);
      }
      position[i] = index[s];
    }
  } else {
    distinct.assign(ids, ids + n);
    for (size_t i = 0; i < n; ++i) position[i] = static_cast<int64_t>(i);
  }
  // A counting sort of the distinct ids by owner, stable.
  const size_t m = distinct.size();
  std::fill(counts, counts + world, 0);
  std::vector<int64_t> place(m);
  for (size_t u = 0; u < m; ++u) ++counts[place[u] = owner_of(distinct[u], world)];
  std::vector<int64_t> next(static_cast<size_t>(world), 0);
  for (size_t w = 1; w < next.size(); ++w) next[w] = next[w - 1] + counts[w - 1];
  for (size_t u = 0; u < m; ++u) {
    place[u] = next[static_cast<size_t>(place[u])]++;
    sent[place[u]] = distinct[u];
  }
  for (size_t i = 0; i < n; ++i) position[i] = place[static_cast<size_t>(position[i])];
  return m;
}

// out[position[i]] (m rows of `dim`) = the sum of the rows i that go there, left to right
// in the order of i, starting from the first one's row (as a deduplicated update sums them).
// Returns whether every sum is finite (a sum of finite rows may overflow to Inf).
inline bool sum_rows_to(const float* rows, size_t n, size_t dim, const int64_t* position, size_t m, float* out) {
  std::vector<uint8_t> seen(m, 0);
  for (size_t i = 0; i < n; ++i) {
    const size_t p = static_cast<size_t>(position[i]);
    if (p >= m) throw ValueError("position " + std::to_string(p) + " out of range for " + std::to_string(m) + " rows");
    float* dst = out + p * dim;
    const float* src = rows + i * dim;
    if (!seen[p]) {
      std::memcpy(dst, src, sizeof(float) * dim);
      seen[p] = 1;
    } else {
      for (size_t j = 0; j < dim; ++j) dst[j] += src[j];
    }
  }
  for (size_t p = 0; p < m; ++p)
    if (!seen[p]) throw ValueError("row " + std::to_string(p) + " has no id routed to it");
  bool finite = true;
  for (size_t j = 0; j < m * dim; ++j) finite = finite && std::isfinite(out[j]);
  return finite;
}

// out[i] (n rows of `dim`) = the row that came back for sent id position[i]. The sent ids
// are grouped by owner, counts[w] of owner w (of `world`), and the rows of owner w's start
// at float block_start[w] of `flat`, which holds `flat_floats` floats.
inline void gather_rows_from(const float* flat, size_t flat_floats, size_t dim, const int64_t* block_start,
                             const int64_t* counts, size_t world, const int64_t* position, size_t n, float* out) {
  std::vector<size_t> row_at;  // the float offset of each sent id's row
  for (size_t w = 0; w < world; ++w) {
    const int64_t start = block_start[w], count = counts[w];
    if (start < 0 || count < 0 || static_cast<uint64_t>(start) + static_cast<uint64_t>(count) * dim > flat_floats)
      throw ValueError("the rows of owner " + std::to_string(w) + " (" + std::to_string(count) + " from float " +
                       std::to_string(start) + ") are out of range for " + std::to_string(flat_floats) + " floats");
    for (int64_t j = 0; j < count; ++j) row_at.push_back(static_cast<size_t>(start) + static_cast<size_t>(j) * dim);
  }
  const size_t m = row_at.size();
  for (size_t i = 0; i < n; ++i) {
    const size_t p = static_cast<size_t>(position[i]);
    if (p >= m) throw ValueError("position " + std::to_string(p) + " out of range for " + std::to_string(m) + " rows");
    std::memcpy(out + i * dim, flat + row_at[p], sizeof(float) * dim);
  }
}

}  // namespace mtht
