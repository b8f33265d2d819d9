// How a batch is cut up: reads into pieces over the threads, writes grouped by shard
// (BatchPlan) and, deduplicated, by id (Runs), with the room they hold in the shards.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "mtht/hash.h"
#include "mtht/radix_sort.h"
#include "mtht/scratch_memory.h"
#include "mtht/shard.h"
#include "mtht/thread_pool.h"

namespace mtht {

namespace detail {

// The fewest ids a task of a batch gets when the batch is spread over several threads.
constexpr size_t kMinIdsPerTask = 2048;

// The pieces a read is cut into: each table's ids (one table's, or several tables' read in
// one call) in consecutive pieces of about the same size, about four pieces per thread in
// all, so that the pool shares them out and a thread that starts late, or runs slowly,
// leaves its share to the others; one piece per table on one thread. Piece i is the ids
// [begin(i), end(i)) of table part(i).
class ReadPieces {
 public:
  // counts[k]: table k's ids; `threads`: the threads the read is spread over.
  ReadPieces(std::vector<size_t> counts, size_t threads) : counts_(std::move(counts)) {
    size_t total = 0;
    for (size_t c : counts_) total += c;
    const size_t piece = std::max(kMinIdsPerTask, total / (4 * threads));
    first_.push_back(0);
    for (size_t c : counts_)
      first_.push_back(first_.back() + (threads == 1 ? 1 : std::max<size_t>(1, (c + piece / 2) / piece)));
  }
  size_t size() const { return first_.back(); }
  size_t part(size_t i) const {
    return static_cast<size_t>(std::upper_bound(first_.begin(), first_.end(), i) - first_.begin()) - 1;
  }
  size_t begin(size_t i) const { return bound(part(i), i); }
  size_t end(size_t i) const { return bound(part(i), i + 1); }

 private:
  size_t bound(size_t k, size_t i) const { return counts_[k] * (i - first_[k]) / (first_[k + 1] - first_[k]); }
  std::vector<size_t> counts_;
  std::vector<size_t> first_;  // the first piece of each table, then the number of pieces
};

// How many consecutive ranges to split n items of light per-item work into: one per
// thread, but none smaller than waking a thread is worth.
inline size_t range_parts(size_t n) {
  constexpr size_t kMinPerPart = 16384;
  return std::max<size_t>(1, std::min<size_t>(ThreadPool::global().usable_threads(), n / kMinPerPart));
}

// Runs fn(part, begin, end) for the `parts` consecutive ranges of [0, n), over the pool.
template <class Fn>
void for_ranges(size_t n, size_t parts, Fn&& fn) {
  ThreadPool::global().parallel_for(parts, [&](size_t p) { fn(p, n * p / parts, n * (p + 1) / parts); });
}

// Ids of a batch grouped by shard, input order kept inside each shard. The ids and their
// hashes are copied into that order too, so the batch loops read them sequentially (read
// through `order`, they would be cache misses once the plan no longer fits in the L2).
struct BatchPlan {
 private:
  // The three arrays below in one block: one exchange with ScratchMemory (a lock and a
  // search) instead of three, which a write to many small tables pays for every table.
  ScratchBlock block_;

 public:
  ScratchArray<int64_t> keys;         // keys[k] = ids[order[k]]
  ScratchArray<uint64_t> hashes;      // hashes[k] = hash of keys[k]
  ScratchArray<uint32_t> order;       // input positions, shard by shard
  std::vector<size_t> shard_begin;    // num_shards + 1 offsets into order

  // The plan of ids[0, n), built on the calling thread.
  BatchPlan(const int64_t* ids, size_t n, int shard_bits) : BatchPlan(ids, n, shard_bits, 1) {
    count_range(0);
    place_range(0);
  }

  // A plan built by several threads: count_range(r) for every range r < ranges (the batch
  // cut into that many consecutive ranges), then place_range(r) for every r.
  BatchPlan(const int64_t* ids, size_t n, int shard_bits, size_t ranges)
      : block_(checked_size(n) * (sizeof(int64_t) + sizeof(uint64_t) + sizeof(uint32_t))),
        keys(block_.data()),
        hashes(block_.data() + n * sizeof(int64_t)),
        order(block_.data() + n * (sizeof(int64_t) + sizeof(uint64_t))),
        ids_(ids), n_(n), ranges_(ranges), shard_bits_(shard_bits),
        counts_(ranges << shard_bits, 0) {}

  // A plan that holds only where each shard's ids would start (shard_begin; count[s] ids
  // in shard s), no ids: for a write on one thread in input order, which reads nothing else
  // of it (EmbeddingTable::write_planned_in_order; deduplicated, its runs grouped in input
  // order: EmbeddingTable::group_runs). Sorting a small table's part of a
  // multi-table write by shard took about a tenth of the write (perf: fused steps of 8
  // tables of 25,000 entries, 2,048 ids each, one thread).
  explicit BatchPlan(const std::vector<uint64_t>& count)
      : block_(0), keys(nullptr), hashes(nullptr), order(nullptr), ids_(nullptr), n_(0), ranges_(0), shard_bits_(0) {
    shard_begin.assign(count.size() + 1, 0);
    for (size_t s = 0; s < count.size(); ++s) shard_begin[s + 1] = shard_begin[s] + count[s];
  }

  // Whether the plan holds its ids in shard order (not a plan of counts alone).
  bool ordered() const { return ranges_ != 0; }

  size_t num_ranges() const { return ranges_; }

  // Counts the ids of range r in each shard, and zeroes range r's share of the arrays.
  void count_range(size_t r) {
    // Zeroing brings the lines into the cache for writing in a sequential pass, which the
    // hardware prefetches; place_range then writes 3 x num_shards streams at random, and
    // fetching each line for that cost more (C++ loop, a 65,536-id plan whose arrays are
    // not cached: 5.6 ns per id without this pass, 3.3 with it).
    zero_share(order.data(), r);
    zero_share(keys.data(), r);
    zero_share(hashes.data(), r);
    uint32_t* count = counts_.data() + (r << shard_bits_);
    const int shift = 64 - shard_bits_;
    const size_t b = range_begin(r), e = range_begin(r + 1);
    if (shard_bits_ == 0) count[0] = static_cast<uint32_t>(e - b);
    else
      for (size_t i = b; i < e; ++i) ++count[hash_id(ids_[i]) >> shift];
  }

  // Places the ids of range r: after those of the same shard in earlier ranges. Range 0
  // also fills shard_begin.
  void place_range(size_t r) {
    const size_t num_shards = size_t{1} << shard_bits_;
    std::vector<size_t> cursor(num_shards);
    size_t total = 0;
    for (size_t s = 0; s < num_shards; ++s) {
      size_t before = 0, all = 0;
      for (size_t q = 0; q < ranges_; ++q) {
        const uint32_t c = counts_[(q << shard_bits_) + s];
        if (q < r) before += c;
        all += c;
      }
      cursor[s] = total + before;
      total += all;
    }
    if (r == 0) {
      shard_begin.assign(num_shards + 1, total);
      for (size_t s = 0; s < num_shards; ++s) shard_begin[s] = cursor[s];
    }
    const int shift = 64 - shard_bits_;
    for (size_t i = range_begin(r), e = range_begin(r + 1); i < e; ++i) {
      const uint64_t h = hash_id(ids_[i]);
      const size_t k = cursor[shard_bits_ ? (h >> shift) : 0]++;
      order[k] = static_cast<uint32_t>(i);
      keys[k] = ids_[i];
      hashes[k] = h;
    }
  }

 private:
  static size_t checked_size(size_t n) {
    if (n > 0xFFFFFFFFull) throw ValueError("a batch holds at most 2^32 - 1 ids");
    return n;
  }
  size_t range_begin(size_t r) const { return n_ * r / ranges_; }
  template <class T>
  void zero_share(T* array, size_t r) const {
    const size_t count = range_begin(r + 1) - range_begin(r);
    if (count) std::memset(array + range_begin(r), 0, sizeof(T) * count);  // an empty plan has no arrays
  }

  const int64_t* ids_;  // the batch, read while the plan is built
  size_t n_, ranges_;
  int shard_bits_;
  std::vector<uint32_t> counts_;  // [range][shard]
};

// Groups the ids of consecutive shards [first_shard, last_shard) of a plan by id (and
// block), shard by shard, each shard's runs in order of first occurrence, and sums the rows
// (gradients) of every run that occurs more than once, left to right. O(n) with a hash table
// per shard, sized for the shard (a quarter full at most) so that it stays in the L1 cache.
struct Runs {
  static constexpr uint32_t kEnd = 0xFFFFFFFFu;
  static constexpr size_t kAhead = 8;   // rows prefetched this many repeats ahead (sum_repeats)
  static constexpr size_t kFewIds = 8;  // shards of at most this many ids are grouped without a hash table
  std::vector<uint32_t> first;   // each run's first occurrence (a plan position)
  std::vector<uint32_t> count;   // each run's occurrences
  std::vector<uint32_t> sum_of;  // each run's row in `sums`, or kEnd if it occurs once
  std::vector<size_t> begin;     // the runs of shard s: [begin[s], begin[s + 1])
  std::vector<float> sums;       // the summed rows, `width` floats each
  std::vector<int64_t> ids;      // group_in_order: each run's id
  std::vector<uint64_t> hashes;  // group_in_order: each run's hash_id

  // The runs of each of `chunks` chunks of a write, kept by the calling thread from one
  // write to the next so that their memory is reused. A write groups every chunk before it
  // writes any (the group allocates), so it needs them all at once.
  static std::vector<Runs>& per_chunk(size_t chunks) {
    static thread_local std::vector<Runs> runs;
    if (runs.size() < chunks) runs.resize(chunks);
    return runs;
  }

  // Gives back the memory of an unusually large batch once it is written, so that a thread
  // does not keep it (the sums of a batch of 10M ids at dim 64 could take gigabytes).
  void trim() {
    constexpr size_t kKeepBytes = size_t{16} << 20;
    auto drop_if_large = [](auto& v) {
      if (v.capacity() * sizeof(v[0]) > kKeepBytes) std::decay_t<decltype(v)>().swap(v);
    };
    drop_if_large(first);
    drop_if_large(count);
    drop_if_large(sum_of);
    drop_if_large(sums);
    drop_if_large(ids);
    drop_if_large(hashes);
    drop_if_large(slots_);
    drop_if_large(position_hashes_);
    drop_if_large(repeats_);
  }

  // row(input position): the `width` floats summed for that occurrence.
  //
  // Two passes: the first groups the ids alone (its hash table stays in the L1 cache) and
  // lists the occurrences after the first; the second sums their rows, each run's from its
  // first occurrence on. A row that occurs once is not read here: the write reads it, with
  // the entry's lines, so no row is read twice.
  template <class Row>
  void group(const BatchPlan& plan, size_t first_shard, size_t last_shard, const uint32_t* blocks, size_t width,
             Row&& row) {
    const size_t* sb = plan.shard_begin.data();
    const uint32_t* order = plan.order.data();
    const int64_t* keys = plan.keys.data();
    const uint64_t* hashes = plan.hashes.data();
    const size_t n = sb[last_shard] - sb[first_shard];
    first.resize(n);  // room for n runs, trimmed at the end (no growth checks in the loop)
    count.resize(n);
    sum_of.resize(n);
    repeats_.resize(n);
    begin.resize(plan.shard_begin.size());
    uint32_t runs = 0;
    size_t n_repeats = 0;
    // Plain pointers: through the members, every pass of the loop would reload them.
    uint32_t* run_first = first.data();
    uint32_t* run_count = count.data();
    uint32_t* run_sum = sum_of.data();
    Repeat* repeats = repeats_.data();
    auto new_run = [&](size_t k) {
      run_first[runs] = static_cast<uint32_t>(k);
      run_count[runs] = 1;
      run_sum[runs] = kEnd;
      return runs++;
    };
    auto repeat = [&](uint32_t r, size_t k) {
      ++run_count[r];
      repeats[n_repeats++] = Repeat{r, static_cast<uint32_t>(k)};
    };
    // Whether plan position k holds run r's id (and block).
    auto of_run = [&](uint32_t r, size_t k, uint32_t block) {
      const uint32_t head = run_first[r];
      return keys[head] == keys[k] && (!blocks || blocks[order[head]] == block);
    };
    for (size_t s = first_shard; s < last_shard; ++s) {
      begin[s] = runs;
      if (sb[s + 1] == sb[s]) continue;
      if (sb[s + 1] - sb[s] <= kFewIds) {
        // A shard of a few ids looks for each among the runs so far: filling a hash table
        // for them cost more (a batch of 200 ids over 64 shards gives each about 3).
        for (size_t k = sb[s]; k < sb[s + 1]; ++k) {
          const uint32_t block = blocks ? blocks[order[k]] : 0;
          uint32_t r = begin[s];
          while (r < runs && !of_run(r, k, block)) ++r;
          if (r == runs) new_run(k);
          else repeat(r, k);
        }
        continue;
      }
      // At most a quarter full: at a half, collisions (each a mispredicted branch) took
      // about a quarter of the grouping's time.
      size_t cap = 16;
      while (cap < 4 * (sb[s + 1] - sb[s])) cap *= 2;
      if (slots_.size() < cap) slots_.resize(cap);
      Slot* slots = slots_.data();
      std::memset(slots, 0xFF, sizeof(Slot) * cap);  // every run kEnd: empty
      const size_t mask = cap - 1;
      for (size_t k = sb[s]; k < sb[s + 1]; ++k) {
        const uint32_t block = blocks ? blocks[order[k]] : 0;
        const uint64_t h = blocks ? mix64(hashes[k] ^ (static_cast<uint64_t>(block) * 0x9e3779b97f4a7c15ULL)) : hashes[k];
        const uint32_t tag = static_cast<uint32_t>(h >> 32);
        for (size_t i = h & mask;; i = (i + 1) & mask) {
          Slot& slot = slots[i];
          if (slot.run == kEnd) {
            slot = Slot{tag, new_run(k)};
            break;
          }
          if (slot.tag != tag || !of_run(slot.run, k, block)) continue;
          repeat(slot.run, k);
          break;
        }
      }
    }
    begin[last_shard] = runs;
    first.resize(runs);
    count.resize(runs);
    sum_of.resize(runs);
    sum_repeats([order](uint32_t k) { return order[k]; }, n_repeats, width, row);
  }

  // Run r's row: the sum of its rows, or, for a run occurring once, row(its position).
  template <class Row>
  const float* summed_row(const BatchPlan& plan, size_t r, size_t width, Row&& row) const {
    return sum_of[r] == kEnd ? row(plan.order[first[r]]) : sums.data() + static_cast<size_t>(sum_of[r]) * width;
  }

  // The runs of ids [0, n) without a plan, for a write on one thread in input order: the
  // runs in order of first occurrence, `first` holding input positions, `ids` and `hashes`
  // each run's id and hash, `begin` unused. One hash table for the whole batch (half full
  // at most), which lies in the L2 cache rather than the L1 (a shard's does), but spares the
  // plan, whose order reaches the caller's rows at random (write_in_order). `blocks` (may
  // be null), nondecreasing, splits the batch as for group: an id's occurrences in two
  // blocks are two runs, in block order.
  template <class Row>
  void group_in_order(const int64_t* in, size_t n, size_t width, Row&& row, const uint32_t* blocks = nullptr) {
    first.resize(n);
    count.resize(n);
    sum_of.resize(n);
    ids.resize(n);
    hashes.resize(n);
    repeats_.resize(n);
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    if (slots_.size() < cap) slots_.resize(cap);
    Slot* slots = slots_.data();
    std::memset(slots, 0xFF, sizeof(Slot) * cap);  // every run kEnd: empty
    const size_t mask = cap - 1;
    uint32_t runs = 0;
    size_t n_repeats = 0;
    if (position_hashes_.size() < n) position_hashes_.resize(n);
    uint64_t* hashed = position_hashes_.data();
    for (size_t k = 0; k < n; ++k) hashed[k] = hash_id(in[k]);
    constexpr size_t kSlotsAhead = 16;  // the table is past the L1 cache: its slots are fetched ahead
    for (size_t k = 0; k < std::min(n, kSlotsAhead); ++k) __builtin_prefetch(slots + (hashed[k] & mask), 1);
    for (size_t k = 0; k < n; ++k) {
      if (k + kSlotsAhead < n) __builtin_prefetch(slots + (hashed[k + kSlotsAhead] & mask), 1);
      const int64_t id = in[k];
      const uint64_t h = hashed[k];
      const uint32_t tag = static_cast<uint32_t>(h >> 32);
      for (size_t i = h & mask;; i = (i + 1) & mask) {
        Slot& slot = slots[i];
        if (slot.run == kEnd) {
          slot = Slot{tag, runs};
          first[runs] = static_cast<uint32_t>(k);
          count[runs] = 1;
          sum_of[runs] = kEnd;
          ids[runs] = id;
          hashes[runs++] = h;
          break;
        }
        if (slot.tag != tag || ids[slot.run] != id || (blocks && blocks[first[slot.run]] != blocks[k])) continue;
        ++count[slot.run];
        repeats_[n_repeats++] = Repeat{slot.run, static_cast<uint32_t>(k)};
        break;
      }
    }
    for (auto* v : {&first, &count, &sum_of}) v->resize(runs);
    ids.resize(runs);
    hashes.resize(runs);
    sum_repeats([](uint32_t k) { return k; }, n_repeats, width, row);
  }

  // Run r's row after group_in_order.
  template <class Row>
  const float* row_in_order(size_t r, size_t width, Row&& row) const {
    return sum_of[r] == kEnd ? row(first[r]) : sums.data() + static_cast<size_t>(sum_of[r]) * width;
  }

 private:
  // The second pass of a grouping: for each of the `n` occurrences after a run's first, in
  // the grouping's order, its row added to the run's sum, which starts as the row of the
  // first occurrence. position(k): the input position of grouping position k.
  template <class Position, class Row>
  void sum_repeats(Position&& position, size_t n, size_t width, Row&& row) {
    const size_t bytes = sizeof(float) * width;
    const Repeat* repeats = repeats_.data();
    uint32_t summed = 0;
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        const Repeat& ahead = repeats[i + kAhead];
        prefetch_lines(row(position(ahead.position)), bytes);
        if (sum_of[ahead.run] == kEnd) prefetch_lines(row(position(first[ahead.run])), bytes);
      }
      const Repeat& rep = repeats[i];
      uint32_t& at = sum_of[rep.run];
      if (at == kEnd) {
        at = summed++;
        if (sums.size() < static_cast<size_t>(summed) * width) sums.resize(2 * static_cast<size_t>(summed) * width);
        float* sum = sums.data() + static_cast<size_t>(at) * width;
        const float* g = row(position(first[rep.run]));
        for (size_t j = 0; j < width; ++j) sum[j] = g[j];
      }
      float* sum = sums.data() + static_cast<size_t>(at) * width;
      const float* g = row(position(rep.position));
      for (size_t j = 0; j < width; ++j) sum[j] += g[j];
    }
  }

  // A slot of the grouping's hash table: 8 bytes, so that the table of a shard of 1,024 ids
  // (4,096 slots) stays in the L1 cache; the id itself is read at the run's first position.
  struct Slot {
    uint32_t tag;  // high bits of the hash
    uint32_t run;  // kEnd: empty
  };
  std::vector<Slot> slots_;
  std::vector<uint64_t> position_hashes_;  // group_in_order: hash_id of each input position
  struct Repeat {
    uint32_t run, position;  // an occurrence after the run's first, at a plan position
  };
  std::vector<Repeat> repeats_;  // group: every occurrence after a run's first, in plan order
};

// The room a write batch holds in the shards it writes (Shard::hold), given back when the
// write is done or has failed: when this is destroyed.
class HeldRoom {
 public:
  explicit HeldRoom(size_t shards) : held_(shards) {}
  HeldRoom(HeldRoom&&) = default;  // leaves the source empty: it releases nothing
  HeldRoom& operator=(HeldRoom&&) = delete;
  ~HeldRoom() {
    for (const Held& h : held_)
      if (h.shard) h.shard->release(h.extra, h.far);
  }

  // Shard s (the caller holds its lock): room for `extra` more entries, and for `far`
  // timestamps kept apart (Shard::hold), held. Each s once.
  void hold(size_t s, Shard& shard, uint64_t extra, uint64_t far = 0) {
    shard.hold(extra, far);
    held_[s] = Held{&shard, extra, far};
  }

 private:
  struct Held {
    Shard* shard = nullptr;
    uint64_t extra = 0, far = 0;
  };
  std::vector<Held> held_;
};

// The ids of one table's writes in one call (the blocks of a fused update, or the parts of
// a table that several parts write), as its capacity check must count them when the table
// has an admission filter. That check counts an id's occurrences before its last one
// (runs = false), and a write admits an absent id once the occurrences seen before reach
// its threshold: one by one without `runs`, and with `runs` (deduplicated) once per block,
// each block's run adding all its occurrences. So every occurrence is kept but those after
// the first in the id's last block of runs.
class AdmissionCount {
 public:
  // The ids of one write, after those added before: `blocks` (nondecreasing, may be null:
  // one block) splits a deduplicated write (`runs`) into runs of their own. Only the
  // occurrences keep(id) holds are added (the others still take their blocks).
  template <class Keep>
  void add(const int64_t* ids, size_t n, const uint32_t* blocks, bool runs, Keep&& keep) {
    for (size_t i = 0; i < n; ++i) {
      if (!keep(ids[i])) continue;
      ids_.push_back(ids[i]);
      block_.push_back(next_block_ + (!runs ? i : blocks ? blocks[i] : 0));
    }
    if (n) next_block_ += !runs ? n : blocks ? uint64_t{blocks[n - 1]} + 1 : 1;
  }
  void add(const int64_t* ids, size_t n, const uint32_t* blocks, bool runs) {
    add(ids, n, blocks, runs, [](int64_t) { return true; });
  }
  // counted() of one write.
  static std::vector<int64_t> of(const int64_t* ids, size_t n, const uint32_t* blocks, bool runs) {
    AdmissionCount count;
    count.add(ids, n, blocks, runs);
    return count.counted();
  }
  // The ids to count occurrence by occurrence (in no particular order).
  std::vector<int64_t> counted() const {
    std::unordered_map<int64_t, uint64_t> last_block;
    last_block.reserve(ids_.size());
    std::vector<int64_t> kept;
    kept.reserve(ids_.size());
    for (size_t i = ids_.size(); i-- > 0;) {  // from the end: an id's first block seen is its last
      const auto [at, first] = last_block.try_emplace(ids_[i], block_[i]);
      if (first || block_[i] != at->second) kept.push_back(ids_[i]);
    }
    return kept;
  }

 private:
  std::vector<int64_t> ids_;
  std::vector<uint64_t> block_;
  uint64_t next_block_ = 0;
};

// The entries a write to a capacity-limited table evicts (EmbeddingTable::choose_victims).
struct Victims {
  std::vector<std::vector<int64_t>> by_shard;  // the ids of each shard
  uint64_t total = 0;
};

// A write batch's plan and the room it holds (EmbeddingTable::reserve_ids).
struct PlannedWrite {
  BatchPlan plan;
  HeldRoom room;
  size_t chunks;           // the write's runs of consecutive shards (EmbeddingTable::write_chunks)
  std::vector<Runs> runs;  // for a deduplicated write: the runs of each chunk (group_runs)
  std::optional<Victims> victims;  // with a capacity limit, when chosen by the caller
};

}  // namespace detail
}  // namespace mtht
