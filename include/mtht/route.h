// Routing a batch of ids to the processes that own them (a table sharded over `world`
// processes, id mod world owning): the ids each process is sent, grouped by owner, each
// once or as given; the rows sent with them (summed per id); and the rows that come back,
// put in the order of the ids given.
#pragma once

#include <algorithm>
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

namespace detail {

// Memory route_ids, sum_rows_to and gather_rows_from reuse from call to call on a thread:
// fresh vectors of a few hundred KB each could come from the system and fault in a page at
// a time at every call (16,384 ids over two owners: 22 to 28 ns an id that way, where the
// work takes 6 to 7).
struct RouteScratch {
  struct Slot {
    int64_t id;
    uint64_t distinct_plus_one;  // 0: empty
  };
  std::vector<Slot> slots;
  std::vector<uint64_t> hashes;
  std::vector<int64_t> distinct;
  std::vector<int64_t> place;  // each distinct id's owner, then its place in `sent`
  std::vector<int64_t> next;
  std::vector<size_t> row_at;  // gather_rows_from: the float offset of each sent id's row
  std::vector<uint8_t> seen;   // sum_rows_to: whether each row has been started

  static RouteScratch& of_this_thread() {
    static thread_local RouteScratch scratch;
    return scratch;
  }
  // Gives back the memory of an unusually large batch (over about 500,000 ids), so that a
  // thread does not keep it: every buffer grows with the ids of a call, and the hash
  // table's is the largest, 32 bytes an id.
  void trim() {
    constexpr size_t kKeepBytes = size_t{16} << 20;
    if (slots.capacity() * sizeof(Slot) > kKeepBytes || row_at.capacity() * sizeof(size_t) > kKeepBytes)
      *this = RouteScratch();
  }
};

// The distinct ids of ids[0, n) in order of first occurrence into `distinct` (sized n, its
// first m used: returns m), and position[i] = the index in `distinct` of ids[i]. A hash
// table of (id, index) slots, at most half full, whose slots are fetched a few ids ahead:
// it outgrows the L1 cache from a few thousand ids.
inline size_t distinct_ids(const int64_t* ids, size_t n, RouteScratch& scratch, int64_t* position) {
  size_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  if (scratch.slots.size() < cap) scratch.slots.resize(cap);
  RouteScratch::Slot* slots = scratch.slots.data();
  std::memset(static_cast<void*>(slots), 0, sizeof(RouteScratch::Slot) * cap);
  const size_t mask = cap - 1;
  scratch.hashes.resize(n);
  uint64_t* hashed = scratch.hashes.data();
  for (size_t i = 0; i < n; ++i) hashed[i] = hash_id(ids[i]);
  scratch.distinct.resize(n);
  int64_t* distinct = scratch.distinct.data();
  constexpr size_t kAhead = 16;
  for (size_t i = 0; i < std::min(n, kAhead); ++i) __builtin_prefetch(slots + (hashed[i] & mask), 1);
  uint64_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(slots + (hashed[i + kAhead] & mask), 1);
    const int64_t id = ids[i];
    size_t s = hashed[i] & mask;
    while (slots[s].distinct_plus_one && slots[s].id != id) s = (s + 1) & mask;
    if (!slots[s].distinct_plus_one) {
      slots[s] = RouteScratch::Slot{id, m + 1};
      distinct[m++] = id;
    }
    position[i] = static_cast<int64_t>(slots[s].distinct_plus_one - 1);
  }
  return static_cast<size_t>(m);
}

}  // namespace detail

// Routes ids[0, n) to `world` owners; with `dedup`, each distinct id is sent once. Writes
// `sent` (room for n ids: grouped by owner, per owner in order of first occurrence),
// `counts` (world: how many of `sent` each owner gets) and `position` (n: the place in
// `sent` of each id given); returns how many ids are sent.
inline size_t route_ids(const int64_t* ids, size_t n, int64_t world, bool dedup, int64_t* sent, int64_t* counts,
                        int64_t* position) {
  if (world < 1) throw ValueError("world size must be at least 1, got " + std::to_string(world));
  detail::RouteScratch& scratch = detail::RouteScratch::of_this_thread();
  // distinct[u]: the u-th distinct id (the u-th id without dedup); position[i] holds ids[i]'s
  // u until the ids are placed.
  const int64_t* distinct = ids;
  size_t m = n;
  if (dedup) {
    m = detail::distinct_ids(ids, n, scratch, position);
    distinct = scratch.distinct.data();
  }
  // A counting sort of the distinct ids by owner, stable. A power-of-two world takes the
  // owner from the low bits (the same non-negative remainder), without a division.
  std::fill(counts, counts + world, 0);
  scratch.place.resize(m);
  int64_t* place = scratch.place.data();
  if ((world & (world - 1)) == 0) {
    const uint64_t low = static_cast<uint64_t>(world) - 1;
    for (size_t u = 0; u < m; ++u) ++counts[place[u] = static_cast<int64_t>(static_cast<uint64_t>(distinct[u]) & low)];
  } else {
    for (size_t u = 0; u < m; ++u) ++counts[place[u] = owner_of(distinct[u], world)];
  }
  scratch.next.assign(static_cast<size_t>(world), 0);
  int64_t* next = scratch.next.data();
  for (size_t w = 1; w < static_cast<size_t>(world); ++w) next[w] = next[w - 1] + counts[w - 1];
  for (size_t u = 0; u < m; ++u) {
    place[u] = next[place[u]]++;
    sent[place[u]] = distinct[u];
  }
  if (dedup) {
    for (size_t i = 0; i < n; ++i) position[i] = place[position[i]];
  } else if (n) {
    std::memcpy(position, place, sizeof(int64_t) * n);
  }
  scratch.trim();
  return m;
}

// route_ids for the ids of `k` tables in one call: table t's ids[t][0, n[t]), each distinct
// one once when dedup[t]. Its sent ids and positions are written to sent and position from
// first[t] = n[0] + ... + n[t - 1] on (each with room for all the ids), how many it sends
// to owner w to counts[w * k + t], and how many it sends in all to sent_of[t].
inline void route_tables(const int64_t* const* ids, const size_t* n, const uint8_t* dedup, size_t k, int64_t world,
                         int64_t* sent, int64_t* position, int64_t* counts, int64_t* sent_of) {
  if (world < 1) throw ValueError("world size must be at least 1, got " + std::to_string(world));
  std::vector<int64_t> table_counts(static_cast<size_t>(world));
  size_t first = 0;
  for (size_t t = 0; t < k; ++t) {
    sent_of[t] = static_cast<int64_t>(
        route_ids(ids[t], n[t], world, dedup[t] != 0, sent + first, table_counts.data(), position + first));
    for (size_t w = 0; w < static_cast<size_t>(world); ++w) counts[w * k + t] = table_counts[w];
    first += n[t];
  }
}

// out[position[i]] (m rows of `dim`) = the sum of the rows i that go there, left to right
// in the order of i, starting from the first one's row (as a deduplicated update sums them).
// Returns whether every sum is finite (a sum of finite rows may overflow to Inf).
inline bool sum_rows_to(const float* rows, size_t n, size_t dim, const int64_t* position, size_t m, float* out) {
  detail::RouteScratch& scratch = detail::RouteScratch::of_this_thread();
  scratch.seen.assign(m, 0);
  uint8_t* seen = scratch.seen.data();
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
  // Inf or NaN: every exponent bit set. Tested on the bits, with no early exit, so that the
  // loop is vectorised.
  uint32_t nonfinite = 0;
  for (size_t j = 0; j < m * dim; ++j) {
    uint32_t bits;
    std::memcpy(&bits, out + j, sizeof bits);
    nonfinite |= (bits & 0x7F800000u) == 0x7F800000u;
  }
  scratch.trim();
  return !nonfinite;
}

// out[i] (n rows of `dim`) = the row that came back for sent id position[i]. The sent ids
// are grouped by owner, counts[w] of owner w (of `world`), and the rows of owner w's start
// at float block_start[w] of `flat`, which holds `flat_floats` floats.
inline void gather_rows_from(const float* flat, size_t flat_floats, size_t dim, const int64_t* block_start,
                             const int64_t* counts, size_t world, const int64_t* position, size_t n, float* out) {
  size_t m = 0;
  for (size_t w = 0; w < world; ++w) {
    const int64_t start = block_start[w], count = counts[w];
    if (start < 0 || count < 0 || static_cast<uint64_t>(start) + static_cast<uint64_t>(count) * dim > flat_floats)
      throw ValueError("the rows of owner " + std::to_string(w) + " (" + std::to_string(count) + " from float " +
                       std::to_string(start) + ") are out of range for " + std::to_string(flat_floats) + " floats");
    m += static_cast<size_t>(count);
  }
  detail::RouteScratch& scratch = detail::RouteScratch::of_this_thread();
  scratch.row_at.resize(m);
  size_t* row_at = scratch.row_at.data();  // the float offset of each sent id's row
  for (size_t w = 0, p = 0; w < world; ++w)
    for (int64_t j = 0; j < counts[w]; ++j)
      row_at[p++] = static_cast<size_t>(block_start[w]) + static_cast<size_t>(j) * dim;
  for (size_t i = 0; i < n; ++i) {
    const size_t p = static_cast<size_t>(position[i]);
    if (p >= m) throw ValueError("position " + std::to_string(p) + " out of range for " + std::to_string(m) + " rows");
    std::memcpy(out + i * dim, flat + row_at[p], sizeof(float) * dim);
  }
  scratch.trim();
}

// gather_rows_from for `k` tables at once: table t's rows (dims[t] floats) from owner w
// start at float block_start[t * world + w] of `flat`, counts[t * world + w] of them, and
// row i of outs[t] is the row of its sent id positions[t][i] (n[t] of them).
inline void gather_tables(const float* flat, size_t flat_floats, const size_t* dims, const int64_t* block_start,
                          const int64_t* counts, size_t world, const int64_t* const* positions, const size_t* n,
                          size_t k, float* const* outs) {
  for (size_t t = 0; t < k; ++t)
    gather_rows_from(flat, flat_floats, dims[t], block_start + t * world, counts + t * world, world, positions[t],
                     n[t], outs[t]);
}

}  // namespace mtht
