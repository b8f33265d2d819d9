// mtht: an embedding hash table from int64 id to a trainable entry.
//
// Design
// ------
// * Entry. An entry is its values (the concatenated segments, spec.h) followed by the
//   concatenated optimizer state of its segments, stored as one fixed-size row; its id and
//   last-update timestamp live in the index. Every int64 is a usable id (no sentinel keys).
// * Shards. The table is split into a power-of-two number of shards chosen by the top bits
//   of the id's hash. Each shard has its own reader/writer lock, index and rows. A write
//   first partitions its ids by shard with a stable counting sort, then threads take whole
//   shards; inside a shard ids are handled in input order by one thread. A read is cut into
//   consecutive ranges (ReadPieces), each read in input order under shared locks of its
//   shards. So concurrent callers are safe, a call needs no lock per id, and results do not
//   depend on the number of threads.
// * Index. Open addressing over buckets of one cache line: 4 slots of (id, row + 1,
//   32-bit timestamp), where row 0 marks a free slot (a timestamp outside [0, 2^32 - 1) is
//   kept apart by the shard), and an overflow count: how many entries stored
//   further on passed over this bucket when they were placed. A probe reads the home bucket
//   (chosen by the hash's bits below the shard's), compares the ids, and moves to the next
//   bucket only while the overflow count says something may lie beyond (linear probing over
//   lines, which the hardware prefetcher follows), so a missing id usually costs one line
//   too. Removing an entry frees its slot and decrements the counts on its path: no
//   tombstones. Load stays <= the table's max load (TableSpec::max_load_permille, default
//   1/2) between writes: a write that passes it by a little grows the index when it is done.
//   Growth doubles an index of up to 2 MiB and grows a larger one by half.
//   (Linear probing clusters: at a load of 0.79, 43% of the ids not in the table probe more
//   than one bucket and 19% of those in it do not sit in their home bucket; at 0.40 it is 4%
//   and 4%. Each such probe is a dependent miss, so a lower load buys speed with index
//   memory.) Since the id and the timestamp sit in the bucket, a lookup touches one index
//   line plus the lines of the values, and an update one index line plus the row.
// * Rows never move. Rows live in per-shard chunks of geometrically growing size
//   (16, 32, 64, ... rows), so growth allocates a new chunk and rehashes only the index
//   (from the ids in it, without touching a row). The row stride is a power of two up to 64
//   bytes, else a multiple of 64 when that wastes at most 1/8, so the values of most rows
//   start on a cache line. Chunks and indexes of 256 KiB and more live on huge pages
//   (buffer.h).
// * Batches. Every operation takes a whole batch, visited in stages: home buckets are
//   prefetched first, then the next bucket when an id may lie past home, then the row
//   (found in buckets already in cache), and only then is the entry used, so many cache
//   misses are in flight and no stage waits on memory. Each stage is a short loop over a
//   block of 16 positions, a block behind the one before. Writes go shard by shard
//   (visit_blocks); reads in input order (read_spans).
// * Writes are validated (lengths, non-finite values, learning rates) before anything
//   changes, and capacity for the new ids of a batch is reserved in every shard before the
//   first entry is touched; so is everything else a write allocates (the grouping of a
//   deduplicated write, the choice of entries a capacity limit evicts, the admission
//   filter's counts), so a failed allocation leaves the table unchanged.
// * Files. This one holds the table (EmbeddingTable); shard.h a shard's index and rows;
//   batch_plan.h how a batch is grouped and shared out over threads; scratch_memory.h the
//   memory batches keep for the next ones; fork_gate.h what makes a fork safe.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <shared_mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "mtht/batch_plan.h"
#include "mtht/buffer.h"
#include "mtht/count_map.h"
#include "mtht/errors.h"
#include "mtht/fork_gate.h"
#include "mtht/hash.h"
#include "mtht/initializers.h"
#include "mtht/kernels.h"
#include "mtht/narrow_values.h"
#include "mtht/quantizers.h"
#include "mtht/radix_sort.h"
#include "mtht/scratch_memory.h"
#include "mtht/shard.h"
#include "mtht/shared_mutex.h"
#include "mtht/spec.h"
#include "mtht/thread_pool.h"

namespace mtht {

// Where each segment's values and state sit inside a row.
struct RowLayout {
  std::vector<SegmentSpec> segments;
  std::vector<int> value_offset;  // in floats, within values
  std::vector<int> state_offset;  // in floats, within state
  int dim = 0;
  int state_dim = 0;
  ValueFormat value_format;
  bool narrow = false;  // values in 16 bits
  int value_words = 0;  // 32-bit words of values: dim, or dim / 2 rounded up; the state follows
  size_t stride = 0;     // bytes per row: values then state, padded (see row_stride)
  bool with_meta = false;  // capacity bookkeeping (write clock, write count) per row

  explicit RowLayout(const TableSpec& spec)
      : segments(spec.segments),
        value_format(static_cast<ValueFormat>(spec.value_format)),
        narrow(value_format != ValueFormat::kFloat32),
        with_meta(spec.max_entries > 0 || spec.max_bytes > 0) {
    for (const auto& s : segments) {
      value_offset.push_back(dim);
      state_offset.push_back(state_dim);
      dim += s.dim;
      state_dim += state_floats(s);
    }
    value_words = narrow ? (dim + 1) / 2 : dim;
    stride = row_stride(sizeof(float) * static_cast<size_t>(value_words + state_dim));
  }
  // Bytes of a row's values.
  size_t value_bytes() const { return narrow ? 2 * static_cast<size_t>(dim) : 4 * static_cast<size_t>(dim); }

  // Rows of at most 64 bytes take a power of two, so that no row straddles a cache line;
  // longer ones a multiple of 64 when that wastes at most 1/8, else a multiple of 16.
  static size_t row_stride(size_t bytes) {
    if (bytes <= 64) {
      size_t s = 8;
      while (s < bytes) s *= 2;
      return s;
    }
    const size_t line = (bytes + 63) / 64 * 64;
    if ((line - bytes) * 8 <= line) return line;
    return (bytes + 15) / 16 * 16;
  }
};

struct TableStats {
  uint64_t size = 0;
  uint64_t capacity = 0;     // index slots
  uint64_t index_bytes = 0;  // memory of the index
  uint64_t row_bytes = 0;    // memory of allocated row chunks
  uint64_t rows_allocated = 0;
  uint64_t row_stride = 0;
  uint64_t num_shards = 0;
  uint64_t max_probe_groups = 0;  // longest probe sequence (in buckets) seen by the last stats() scan
  uint64_t evictions = 0;         // entries removed to respect max_entries
  uint64_t rows_in_use = 0;       // rows handed out (live or free for reuse)
  uint64_t read_block = 0;        // ids per block of a lookup's loop (when all are stored)
  uint64_t write_block = 0;       // ids per block of a write's loop
  uint64_t fetches_ahead = 0;     // the fetches a block holds (MTHT_FETCHES_AHEAD, or the default)
  uint64_t timestamps_apart = 0;  // entries whose timestamp a slot cannot hold (Shard::stamp)
  uint64_t filter_counts = 0;     // ids the admission filter counts
  uint64_t filter_bytes = 0;      // memory of those counts
  uint64_t filter_forgotten = 0;  // counts forgotten to keep within the filter's capacity
};

namespace detail {

// A value for each slot of ids (slot_of): a default, and a table of all 32,768 slots only when
// some slot has a value of its own. (Such a table takes 128 or 256 KB, which a model of
// many small slot tables would otherwise pay in each.)
template <class T>
class SlotValues {
 public:
  SlotValues() = default;
  template <class Convert>
  SlotValues(T fallback, const std::vector<std::pair<uint32_t, uint32_t>>& own, Convert&& convert)
      : fallback_(fallback) {
    if (own.empty()) return;
    by_slot_.assign(0x8000, fallback);
    for (const auto& [slot, value] : own) by_slot_[slot] = convert(value);
  }
  T of(int64_t id) const { return by_slot_.empty() ? fallback_ : by_slot_[slot_of(id)]; }

 private:
  T fallback_{};
  std::vector<T> by_slot_;
};

// How many table layouts (EmbeddingTable::hold_layout) the calling thread holds.
inline int& layouts_held_here() {
  static thread_local int held = 0;
  return held;
}

}  // namespace detail

class EmbeddingTable {
 public:
  explicit EmbeddingTable(const TableSpec& spec)
      : spec_(spec), layout_((validate(spec), spec)), kernels_(&select_kernel_set()) {
    fixed_shards_ = spec.num_shards != 0;
    max_shard_bits_ = bits_for(fixed_shards_ ? static_cast<uint64_t>(spec.num_shards) : kAutoMaxShards, 1);
    shard_bits_ = fixed_shards_         ? max_shard_bits_
                  : spec.initial_shards ? std::min(max_shard_bits_, bits_for(spec.initial_shards, 1))
                                        : std::min(max_shard_bits_, bits_for(spec.initial_capacity, kSplitEntriesPerShard));
    if (spec.max_bytes) {
      // The most one entry can take: its row and bookkeeping, and a bucket slot at the
      // lowest load the index runs at (half the max load): 64 / 4 / (max / 2) bytes. A
      // table of millions of entries has large shards, whose indexes stay fuller but may
      // take up to kIndexSlackBytes more each: the larger of the two limits holds. Rows
      // left to their shards by evictions (stranded_rows) come off the budget first.
      const uint64_t row = layout_.stride + 16;
      const uint64_t per_entry = row + max_index_bytes_per_entry(spec.max_load_permille);
      const uint64_t shards = uint64_t{1} << max_shard_bits_;
      const uint64_t per_large_entry = row + large_index_bytes_per_entry(spec.max_load_permille, shards);
      const uint64_t slack = shards * kIndexSlackBytes;
      auto fits = [&](uint64_t entries) {
        const uint64_t stranded = stranded_rows(entries, shards) * row;
        if (stranded > spec.max_bytes) return false;
        const uint64_t left = spec.max_bytes - stranded;
        return entries <= left / per_entry || (left > slack && entries <= (left - slack) / per_large_entry);
      };
      uint64_t limit = 0;  // the most entries that fit: fits() holds up to it and not past it
      for (uint64_t step = uint64_t{1} << 62; step; step >>= 1)
        if (limit + step <= spec.max_bytes / row && fits(limit + step)) limit += step;
      if (limit == 0)
        throw ValueError("max_bytes = " + std::to_string(spec.max_bytes) + " does not hold one entry: up to " +
                         std::to_string(per_entry) + " bytes, and " + std::to_string(stranded_rows(1, shards) * row) +
                         " for the rows its evictions may leave to the other of its " + std::to_string(shards) +
                         " shards (num_shards=1 leaves none)");
      spec_.max_entries = spec_.max_entries ? std::min<uint64_t>(spec_.max_entries, limit) : limit;
    }
    hashnet_scale_.reset(new std::atomic<float>[layout_.segments.size()]);
    for (size_t k = 0; k < layout_.segments.size(); ++k) {
      const SegmentSpec& seg = layout_.segments[k];
      steps_.push_back(kernels_->step[seg.opt]);
      hashnet_scale_[k].store(seg.hashnet_init_scale);
      const auto r = static_cast<RetrieverKind>(seg.retriever);
      if (r != RetrieverKind::kRaw) raw_lookup_ = false;
      if (r == RetrieverKind::kHashNet) {
        has_hashnet_ = true;
        widest_one_bit_ = std::max(widest_one_bit_, static_cast<size_t>(seg.dim));
      }
      if (static_cast<OptKind>(seg.opt) == OptKind::kBatchSoftmax) needs_step_ = true;
    }
    // A one-segment entry in 16 bits whose step is the optimizer alone: its kernel's fused
    // step (narrow_step_).
    const SegmentSpec& first = layout_.segments[0];
    if (layout_.narrow && layout_.segments.size() == 1 && static_cast<RetrieverKind>(first.retriever) == RetrieverKind::kRaw &&
        !first.stochastic_rounding_fp16)
      narrow_step_ = kernels_->narrow_step[first.opt][narrow_index(layout_.value_format)];
    for (const SegmentSpec& seg : layout_.segments)
      if (seg.stochastic_rounding_fp16 && layout_.value_format == ValueFormat::kBFloat16)
        bfloat16_wrapped_ = true;
    auto seconds = [](uint32_t days) { return int64_t{days} * 86400; };
    expire_seconds_ = detail::SlotValues<int64_t>(seconds(spec.default_expire_days), spec.slot_expire_days, seconds);
    has_filter_ = spec.has_filter;
    if (has_filter_)
      thresholds_ = detail::SlotValues<uint32_t>(spec.default_occurrence_threshold, spec.slot_occurrence_thresholds,
                                                 [](uint32_t threshold) { return threshold; });
    read_bytes_ = layout_.value_bytes();
    fetches_ahead_ = fetches_ahead_from_env();
    // In half fetches: a bucket (2), the values a lookup reads; for a write the whole row, its
    // bookkeeping line (with a capacity limit) and the caller's row, as wide as the values.
    read_block_ = block_for(2 + half_fetches(read_bytes_));
    write_block_ = block_for(2 + half_fetches(layout_.stride) + (layout_.with_meta ? 2 : 0) +
                             half_fetches(sizeof(float) * static_cast<size_t>(layout_.dim)));
    const size_t shards = size_t{1} << shard_bits_;
    shards_.reserve(shards);
    try {
      for (size_t s = 0; s < shards; ++s) {
        shards_.emplace_back(new_shard(s, shards).release());
        shards_.back()->counts.set_bound(filter_bound(shards));
      }
      if (spec.initial_capacity > 0) {
        const uint64_t per = (spec.initial_capacity + shards - 1) / shards;
        for (auto& sh : shards_) sh->reserve(per);
      }
    } catch (...) {  // no destructor runs for a constructor that throws: free what it made
      for (auto* s : shards_) delete s;
      throw;
    }
    detail::ForkFreedLocks::global().add(&writes_);
  }
  ~EmbeddingTable() {
    detail::ForkFreedLocks::global().remove(&writes_);
    for (auto* s : shards_) delete s;
  }
  EmbeddingTable(const EmbeddingTable&) = delete;
  EmbeddingTable& operator=(const EmbeddingTable&) = delete;

  const char* kernel_name() const { return kernels_->name; }
  uint64_t max_entries() const { return spec_.max_entries; }  // 0 = unlimited (after max_bytes)
  int dim() const { return layout_.dim; }
  int state_dim() const { return layout_.state_dim; }
  int num_segments() const { return static_cast<int>(layout_.segments.size()); }
  const RowLayout& layout() const { return layout_; }
  int64_t max_update_ts() const { return max_update_ts_.load(); }
  int num_shards() const {
    const LayoutHold hold(*this);
    return static_cast<int>(shards_.size());
  }

  // The table's layout (its shards) stays as it is while held: every batch holds it, and a
  // caller that goes over the shards one call at a time holds it across those calls. A
  // thread that holds no layout of any table waits, before it takes one, while a split is
  // under way (maybe_split); a thread that already holds one, or a pool helper, goes on,
  // so that nothing the split waits for can wait for the split. Released by the thread that
  // took it.
  void hold_layout() const {
    int& held = detail::layouts_held_here();
    if (held == 0 && !ThreadPool::on_helper())
      while (split_pending_.load(std::memory_order_acquire)) std::this_thread::sleep_for(std::chrono::microseconds(50));
    layout_mu_.lock_shared();
    ++held;
  }
  void release_layout() const {
    layout_mu_.unlock_shared();
    --detail::layouts_held_here();
  }
  // A hold for longer than a batch (a checkpoint save): no split is tried meanwhile.
  void pin_layout() const {
    hold_layout();
    pins_.fetch_add(1, std::memory_order_relaxed);
  }
  void unpin_layout() const {
    pins_.fetch_sub(1, std::memory_order_relaxed);
    release_layout();
  }

  // Every write holds the table's write gate shared for its whole call (a write to several
  // tables holds each table's: detail::HeldLayouts), and a save holds it alone
  // (hold_writes, for every table of a model at once), so that a save holds each write whole
  // or not at all. A save waiting for the writes under way holds off the next ones
  // (SharedMutex::lock_draining): writes from several threads overlap, and a save waiting
  // for a gap between them could wait for as long as they go on. A write takes the gate
  // before it enters the fork gate (ForkGate::InCall): a write waiting for a save must not
  // hold up a fork, whose thread holds the interpreter's lock, which the save needs to give
  // the gate back. A fork while a save holds it (between two calls,
  // which ForkGate does not cover) leaves it held in the child, where no thread gives it
  // back: the child frees it (detail::ForkFreedLocks).
  void hold_writes() const { writes_.lock_draining(); }
  // hold_writes(), giving up after `wait` (false: not held), so that a caller can check for
  // an interrupt between waits.
  bool try_hold_writes_for(std::chrono::nanoseconds wait) const {
    return writes_.try_lock_draining_until(std::chrono::steady_clock::now() + wait);
  }
  void release_writes() const { writes_.unlock(); }
  class WriteHold {
   public:
    explicit WriteHold(const EmbeddingTable& t) : t_(&t) { t.writes_.lock_shared(); }
    ~WriteHold() {
      if (t_) t_->writes_.unlock_shared();
    }
    WriteHold(WriteHold&& o) noexcept : t_(std::exchange(o.t_, nullptr)) {}
    WriteHold(const WriteHold&) = delete;
    WriteHold& operator=(const WriteHold&) = delete;
    WriteHold& operator=(WriteHold&&) = delete;

   private:
    const EmbeddingTable* t_;
  };

  // hold_layout() for its lifetime.
  class LayoutHold {
   public:
    explicit LayoutHold(const EmbeddingTable& t) : t_(&t) { t.hold_layout(); }
    ~LayoutHold() {
      if (t_) t_->release_layout();
    }
    LayoutHold(LayoutHold&& o) noexcept : t_(std::exchange(o.t_, nullptr)) {}
    LayoutHold(const LayoutHold&) = delete;
    LayoutHold& operator=(const LayoutHold&) = delete;
    LayoutHold& operator=(LayoutHold&&) = delete;

   private:
    const EmbeddingTable* t_;
  };
  // pin_layout() for its lifetime.
  class LayoutPin {
   public:
    explicit LayoutPin(const EmbeddingTable& t) : t_(t) { t.pin_layout(); }
    ~LayoutPin() { t_.unpin_layout(); }
    LayoutPin(const LayoutPin&) = delete;
    LayoutPin& operator=(const LayoutPin&) = delete;

   private:
    const EmbeddingTable& t_;
  };

  // With an automatic shard count (num_shards = 0): splits the shards once a write has asked
  // for it, into the fewest (a power of two, at most kAutoMaxShards) that leave no shard with
  // more than kSplitEntriesPerShard entries and give no write batch seen since the last split
  // more than kSplitIdsPerShard ids per shard (split_for_batch splits before a write whose
  // batch is over the bound). A write asks when it finds a shard it writes
  // to already over the bound (so the split comes one write after the one that took it
  // there), or when its batch is over the bound. Every write calls this once it is done: new
  // batches then wait (hold_layout) while those under way finish, for at most kSplitWait,
  // and the split runs alone. Nothing is tried while the layout is pinned, from a thread
  // that holds a layout or from a pool helper (they cannot wait): a later write asks again.
  // After a wait that timed out (a batch held the layout for over kSplitWait, or a process
  // forked while a batch held it), nothing is tried for ten times as long, so that other
  // threads are not kept waiting again and again.
  void maybe_split() noexcept {
    if (!split_wanted_.load(std::memory_order_relaxed) || pins_.load(std::memory_order_relaxed) > 0) return;
    if (detail::layouts_held_here() > 0 || ThreadPool::on_helper()) return;
    const auto now = std::chrono::steady_clock::now();
    if (now.time_since_epoch().count() < split_retry_at_.load(std::memory_order_relaxed)) return;
    bool idle = false;
    if (!split_pending_.compare_exchange_strong(idle, true, std::memory_order_acq_rel)) return;  // another one splits
    bool alone;
    while (!(alone = layout_mu_.try_lock()) && pins_.load(std::memory_order_relaxed) == 0 &&
           std::chrono::steady_clock::now() < now + kSplitWait)
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    if (!alone && pins_.load(std::memory_order_relaxed) == 0)
      split_retry_at_.store((std::chrono::steady_clock::now() + 10 * kSplitWait).time_since_epoch().count(),
                            std::memory_order_relaxed);
    if (alone) {
      split_wanted_.store(false, std::memory_order_relaxed);
      try {
        const std::vector<uint64_t> finest = entries_by_finest_shard();
        const int bits = std::max(bits_for_entries(finest),
                                  std::min(max_shard_bits_, bits_for(split_batch_.exchange(0), kSplitIdsPerShard)));
        if (bits > shard_bits_) split_shards(bits, finest);
      } catch (...) {
        // Out of memory: the table stays as it was, which only costs speed.
      }
      layout_mu_.unlock();
    }
    split_pending_.store(false, std::memory_order_release);
  }

  // Before a write of n ids: a batch with more ids per shard than the bound splits the
  // shards first, so that it is written over the shards it asks for. (Split after it, a
  // first write of 4M new ids went into one shard, whose index grew over and over on one
  // thread, and then every entry was copied into 64 shards: 5 to 8 times the time and 1.8
  // times the memory of the same write to 64 shards.) As maybe_split, from a thread that
  // holds no layout.
  void split_for_batch(size_t n) noexcept {
    if (fixed_shards_ || n <= kSplitIdsPerShard) return;  // never over the bound: no hold taken
    {
      const LayoutHold hold(*this);
      if (!can_split() || n <= (kSplitIdsPerShard << shard_bits_)) return;
      note_batch_size(n);
    }
    maybe_split();
  }

  // Counted with every shard's shared lock held at once: shard by shard, it could count one
  // shard before a capacity-limited write evicted and another after it inserted, and see
  // the table past max_entries (a write evicts in every shard before it inserts in any).
  uint64_t size() const {
    const detail::ForkGate::InCall in_call;
    const LayoutHold hold(*this);
    const SharedShardLocks locks(*this, nullptr, 0, SIZE_MAX);
    uint64_t n = 0;
    for (auto* s : shards_) n += s->size();
    return n;
  }

  // Every id the table holds, shard by shard in index order (an order not to rely on): the
  // entries of one moment, every shard read under one hold of their locks, as size().
  // Writes them to out, which has room for `capacity` ids, straight into the caller's buffer
  // (a table of a billion ids lists 8 GB of them). Returns how many the table holds; when
  // that is more than `capacity` (a write came between the caller's size() and this call)
  // it writes none, and the caller asks again with room for them.
  size_t stored_ids(int64_t* out, size_t capacity) const {
    const detail::ForkGate::InCall in_call;
    const LayoutHold hold(*this);
    const SharedShardLocks locks(*this, nullptr, 0, SIZE_MAX);
    size_t n = 0;
    for (auto* s : shards_) n += s->size();
    if (n > capacity) return n;
    size_t written = 0;
    for (auto* s : shards_)
      s->for_each_run([&](const detail::Shard::Copied* entries, size_t count) {
        for (size_t i = 0; i < count; ++i) out[written++] = entries[i].key;
      });
    return n;
  }

  TableStats stats(bool probe_lengths = false) const {
    const detail::ForkGate::InCall in_call;
    const LayoutHold hold(*this);
    TableStats st;
    st.num_shards = shards_.size();
    st.row_stride = layout_.stride + (layout_.with_meta ? 16 : 0);
    st.read_block = read_block_;
    st.write_block = write_block_;
    st.fetches_ahead = fetches_ahead_;
    st.evictions = evictions_.load();
    st.filter_forgotten = counts_forgotten_before_;
    {
      const SharedShardLocks locks(*this, nullptr, 0, SIZE_MAX);  // one moment for all shards, as size()
      for (auto* s : shards_) {
        st.size += s->size();
        st.capacity += s->slots();
        st.index_bytes += s->index_bytes() + s->far_timestamp_bytes();
        st.timestamps_apart += s->far_timestamps();
        st.row_bytes += s->rows().bytes();
        st.rows_allocated += s->rows().capacity();
        st.rows_in_use += s->rows().rows_used();
        st.filter_counts += s->counts.size();
        st.filter_bytes += s->counts.bytes();
        st.filter_forgotten += s->counts.forgotten();
      }
    }
    if (probe_lengths)  // a pass over each index: one shard at a time
      for (auto* s : shards_) {
        std::shared_lock<detail::SharedMutex> lk(s->mu);
        st.max_probe_groups = std::max(st.max_probe_groups, s->max_probe_groups());
      }
    return st;
  }

  // out[N, dim]: the stored values, or zeros for a missing id (nothing is inserted).
  void lookup(const int64_t* ids, size_t n, float* out) const {
    const detail::ForkGate::InCall in_call;
    const size_t d = static_cast<size_t>(layout_.dim);
    const bool streamed = n * d * sizeof(float) >= detail::kStreamedOutputBytes;
    for_each_read_range(n, [&](size_t b, size_t e) {
      const IdSpan span{ids + b, e - b};
      float* const dest = out + b * d;
      lookup_spans(&span, 1, &dest, streamed);
    });
  }

  // Ids a read goes over, in order (read_spans).
  struct IdSpan {
    const int64_t* ids;
    size_t n;
  };

  // A lookup of the ids of spans[0, count) on the calling thread, the row of id i of span s
  // going to outs[s] + i * dim: the piece of a lookup for callers that schedule several
  // tables' lookups as one set of tasks (multi_table.h, and the fused lookup, whose ids of one
  // table come in several blocks). `streamed`: the whole call's output is large (kStreamedOutputBytes).
  void lookup_spans(const IdSpan* spans, size_t count, float* const* outs, bool streamed) const {
    const size_t d = static_cast<size_t>(layout_.dim);
    const size_t bytes = sizeof(float) * d;
    // A row a compressor changes goes from the table through the compressor into a buffer on
    // the stack, then is streamed like the others, where it fits the buffer (fixed_r8 lookups
    // at dim 64: about 1.1x); wider ones, and rows widened from 16 bits, are written the usual way.
    alignas(64) float retrieved[kRetrieveBufferFloats];
    streamed = streamed && (raw_lookup_ || d <= kRetrieveBufferFloats) && !layout_.narrow;
    for (size_t s = 0; s < count; ++s) streamed = streamed && detail::can_stream(outs[s], bytes);
    if (layout_.narrow) {  // a loop of its own, so that float32 lookups test nothing more per id
      read_spans(spans, count, [&](size_t span, size_t i, detail::Shard::Slot, const float* row) {
        float* dst = outs[span] + i * d;
        if (!row) {
          std::memset(dst, 0, bytes);
        } else {
          read_values(row, dst);
          if (!raw_lookup_) retrieve(dst, dst);
        }
      });
      return;
    }
    read_spans(spans, count, [&](size_t span, size_t i, detail::Shard::Slot, const float* row) {
      float* dst = outs[span] + i * d;
      if (!row) {
        std::memset(dst, 0, bytes);
      } else if (streamed && raw_lookup_) {
        detail::copy_row_streamed(dst, row, bytes);
      } else if (streamed) {
        retrieve(row, retrieved);
        detail::copy_row_streamed(dst, retrieved, bytes);
      } else if (raw_lookup_) {
        detail::copy_row(dst, row, bytes);
      } else {
        retrieve(row, dst);
      }
    });
    if (streamed) detail::end_streaming();
  }

  // A write to several tables that must change all of them or none (multi_table.h) takes
  // every capacity-limited table's capacity lock (an empty lock for the others), plans each
  // part (victims_for, reserve_ids), then writes each with its plan.
  std::unique_lock<std::mutex> lock_capacity() const {
    return spec_.max_entries ? std::unique_lock<std::mutex>(capacity_mu_) : std::unique_lock<std::mutex>();
  }
  // Throws, changing nothing, when a write of these ids could not fit under max_entries
  // (`runs`: one admission per distinct id, as with dedup). The caller holds lock_capacity().
  void check_room(const int64_t* ids, size_t n, bool runs) const {
    if (!spec_.max_entries) return;
    Room room;  // not room_kept_: two parts of one write to several tables may check a table at once
    room_for(ids, n, runs, true, room);
  }

  // Small batches stay on the calling thread: waking helpers costs more than it saves.
  static int threads_for(size_t n) { return n < 4096 ? 1 : 0; }
  // The number of threads a batch of n ids is spread over: one inside a task of a call
  // that has helpers (a checkpoint's files loaded over the threads), where the pool could
  // not give it more, so that it takes the paths made for one thread.
  static size_t batch_threads(size_t n) {
    if (threads_for(n) == 1 || ThreadPool::in_shared_call()) return 1;
    return static_cast<size_t>(ThreadPool::global().usable_threads());
  }

  void contains(const int64_t* ids, size_t n, uint8_t* out) const {
    const detail::ForkGate::InCall in_call;
    for_each_shard_read(ids, n, [&](size_t i, detail::Shard::Slot, const float* row) { out[i] = row != nullptr; });
  }

  // Raw values, optimizer state and timestamp of each id; found[i] = 0 when missing
  // (its outputs are then zero).
  void lookup_entries(const int64_t* ids, size_t n, float* values, float* state, int64_t* ts,
                      uint8_t* found) const {
    const detail::ForkGate::InCall in_call;
    const int d = layout_.dim, sd = layout_.state_dim;
    for_each_shard_read(ids, n, [&](size_t i, detail::Shard::Slot slot, const float* row) {
      found[i] = row != nullptr;
      if (row) {
        read_values(row, values + i * d);
        // state is null for an optimizer without state (SGD), which memcpy may not take
        if (sd) std::memcpy(state + i * sd, row + layout_.value_words, sizeof(float) * sd);
        ts[i] = shards_[shard_of(hash_id(ids[i]))]->ts_of(slot);
      } else {
        std::memset(values + i * d, 0, sizeof(float) * d);
        if (sd) std::memset(state + i * sd, 0, sizeof(float) * sd);
        ts[i] = 0;
      }
    });
  }

  // Upsert rows; the last duplicate wins. New entries get their optimizer state initialised.
  void assign(const int64_t* ids, size_t n, const float* values, int64_t ts) {
    const WriteHold writing(*this);  // before the fork gate: see WriteHold
    const detail::ForkGate::InCall in_call;
    check_finite(values, n * layout_.dim, "values");
    split_for_batch(n);
    assign_rows(ids, n, values, ts);
    maybe_split();
  }

  // Upsert and add: a new entry is initialised, then the row is added; duplicates accumulate.
  void assign_add(const int64_t* ids, size_t n, const float* values, int64_t ts) {
    const WriteHold writing(*this);  // before the fork gate: see WriteHold
    const detail::ForkGate::InCall in_call;
    check_finite(values, n * layout_.dim, "values");
    split_for_batch(n);
    add_rows(ids, n, values, ts);
    maybe_split();
  }

  // assign and assign_add with the values already checked. `planned`: the batch's plan and
  // room from reserve_ids, the caller holding lock_capacity() (a write to several tables).
  void assign_rows(const int64_t* ids, size_t n, const float* values, int64_t ts,
                   const detail::PlannedWrite* planned = nullptr) {
    const size_t bytes = sizeof(float) * layout_.dim;
    for_each_shard_write(ids, n, ts, detail::BatchRows{values, bytes}, [&](detail::Shard& sh, size_t i, int64_t id, uint64_t h, const Found& known) {
      const Found found = admit(sh, id, h, 1, known);
      if (!found.slot.bucket) return;
      write_values(found.entry.values, values + i * layout_.dim);
      sh.stamp(found.slot, ts);
    }, true, true, planned != nullptr, planned, far_stamp(ts));
  }
  void add_rows(const int64_t* ids, size_t n, const float* values, int64_t ts,
                const detail::PlannedWrite* planned = nullptr) {
    const int d = layout_.dim;
    for_each_shard_write(ids, n, ts, detail::BatchRows{values, sizeof(float) * d}, [&](detail::Shard& sh, size_t i, int64_t id, uint64_t h, const Found& known) {
      const Found found = admit(sh, id, h, 1, known);
      if (!found.slot.bucket) return;
      const float* v = values + i * d;
      if (layout_.narrow) {
        add_narrow_row(found.entry.values, v);
      } else {
        float* w = found.entry.values;
        for (int j = 0; j < d; ++j) w[j] += v[j];
      }
      sh.stamp(found.slot, ts);
    }, true, true, planned != nullptr, planned, far_stamp(ts));
  }

  // One optimizer step per occurrence in input order, or (dedup) one step per unique id with
  // its gradients summed left to right. Missing ids are created, initialised, then stepped.
  //
  // `blocks` (optional, one number per position) splits the batch into consecutive blocks:
  // with dedup, gradients are summed only within a block, and the blocks of one id are
  // stepped in block order (the fused multi-shard update).
  void apply_gradients(const int64_t* ids, size_t n, const float* grads, const float* lrs, size_t n_lrs,
                       int64_t global_step, int64_t ts, bool dedup, const uint32_t* blocks = nullptr) {
    const WriteHold writing(*this);  // before the fork gate: see WriteHold
    const detail::ForkGate::InCall in_call;
    check_learning_rates(lrs, n_lrs);
    check_finite(grads, n * layout_.dim, "gradients");
    check_step(global_step);
    split_for_batch(n);
    const size_t d = static_cast<size_t>(layout_.dim);
    apply_gradient_rows(ids, n, [grads, d](size_t i) { return grads + i * d; }, lrs, global_step, ts, dedup, blocks,
                        false);
    maybe_split();
  }

  // apply_gradients with the gradient row of position i at grad_row(i), the learning rates,
  // gradients and step already checked by the caller; `room_held`: the caller holds
  // lock_capacity() and checked the write with check_room; `planned`: the batch's plan and
  // room, from reserve_ids (a write to several tables, multi_table.h).
  template <class GradRow>
  void apply_gradient_rows(const int64_t* ids, size_t n, GradRow grad_row, const float* lrs, int64_t global_step,
                           int64_t ts, bool dedup, const uint32_t* blocks, bool room_held,
                           const detail::PlannedWrite* planned = nullptr) {
    if (n > 0) update_hashnet_scales(global_step);
    const uint64_t step_seed = stochastic_step_seed(spec_.random_seed, global_step);  // values in 16 bits
    const int d = layout_.dim;
    const size_t bytes = sizeof(float) * static_cast<size_t>(d);
    auto prefetch_grad = [&](size_t i) { detail::prefetch_lines(grad_row(i), bytes); };
    if (!dedup) {
      for_each_shard_write(ids, n, ts, prefetch_grad, [&](detail::Shard& sh, size_t i, int64_t id, uint64_t h, const Found& known) {
        const Found found = admit(sh, id, h, 1, known);
        if (!found.slot.bucket) return;
        step_row(found.entry.values, id, grad_row(i), lrs, global_step, step_seed);
        sh.stamp(found.slot, ts);
      }, true, true, room_held, planned, far_stamp(ts));
      return;
    }
    for_each_shard_write_runs(ids, n, ts, blocks, grad_row, static_cast<size_t>(d),
                              [&](detail::Shard& sh, const float* g, size_t count, int64_t id, uint64_t h,
                                  const Found& known) {
                                const Found found = admit(sh, id, h, count, known);
                                if (!found.slot.bucket) return;
                                step_row(found.entry.values, id, g, lrs, global_step, step_seed);
                                sh.stamp(found.slot, ts);
                              },
                              room_held, planned);
  }

  // ---- lifecycle -------------------------------------------------------------------------

  // Seconds after its last write at which an id expires (by its slot).
  int64_t expire_seconds(int64_t id) const { return expire_seconds_.of(id); }

  // Expired at `now` (Monolith: now - ts >= expire days * 86400), without int64 overflow.
  bool expired(int64_t id, int64_t ts, int64_t now) const {
    return static_cast<__int128>(now) - ts >= expire_seconds(id);
  }

  // Removes every entry expired at `max_update_time`; returns how many. Their memory is reused.
  uint64_t evict(int64_t max_update_time) {
    const WriteHold writing(*this);  // before the fork gate: see WriteHold
    const detail::ForkGate::InCall in_call;
    const LayoutHold hold(*this);
    std::atomic<uint64_t> removed{0};
    ThreadPool::global().parallel_for(shards_.size(), [&](size_t s) {
      detail::Shard& sh = *shards_[s];
      std::unique_lock<detail::SharedMutex> lk(sh.mu);
      removed += sh.erase_if([&](int64_t id, int64_t ts, uint32_t) { return expired(id, ts, max_update_time); });
    });
    // A capacity-limited write under way may have counted a removed entry present: it
    // inserts it again without a record in the kept victims.
    if (removed.load()) drop_kept_victims();
    return removed.load();
  }

  void set_max_update_ts(int64_t ts) { max_update_ts_.store(ts); }
  bool has_filter() const { return has_filter_; }
  // Whether a capacity check must count the admissions of a write's blocks or parts as they
  // make them (detail::AdmissionCount), rather than by the write's own rule.
  bool counts_admissions() const { return spec_.max_entries && has_filter_; }

  float hashnet_scale_of(size_t segment) const { return hashnet_scale_[segment].load(); }
  void set_hashnet_scale(size_t segment, float v) { hashnet_scale_[segment].store(v); }
  // The scales a write of ids at `global_step` sets: for a table that takes part in a write
  // with none of its ids here (the part of a table sharded over processes, whose other
  // parts are written).
  void advance_hashnet_scales(int64_t global_step) { update_hashnet_scales(global_step); }

  // Calls fn(id, ts, values_then_state) for every entry of shard s, in row order (sequential
  // reads), under the shard's read lock.
  template <class Fn>
  void scan_shard(size_t s, Fn&& fn) const {
    scan_shard(s, fn, [](int64_t, uint64_t, bool) {});
  }
  // The same, then count_fn(id, count, older) for the shard's filter counts (as scan_counts),
  // under the same hold of its lock: an id admitted meanwhile would be in neither.
  template <class Fn, class CountFn>
  void scan_shard(size_t s, Fn&& fn, CountFn&& count_fn) const {
    const detail::ForkGate::InCall in_call;
    const LayoutHold hold(*this);
    const detail::Shard& sh = *shards_[s];
    // With values in 16 bits: an entry's values widened, the state after them, as a float32
    // table keeps it.
    std::vector<float> entry(layout_.narrow ? static_cast<size_t>(layout_.dim + layout_.state_dim) : 0);
    std::shared_lock<detail::SharedMutex> lk(sh.mu);
    if (!layout_.narrow) {
      sh.for_each_entry([&](int64_t id, int64_t ts, uint32_t r) { fn(id, ts, sh.entry(r).values); });
    } else {
      sh.for_each_entry([&](int64_t id, int64_t ts, uint32_t r) {
        const float* row = sh.entry(r).values;
        read_values(row, entry.data());
        std::memcpy(entry.data() + layout_.dim, row + layout_.value_words, sizeof(float) * layout_.state_dim);
        fn(id, ts, static_cast<const float*>(entry.data()));
      });
    }
    sh.counts.for_each(count_fn);
  }

  // Part i of n of the table's entries, by hash (file i of a checkpoint in n files), so that
  // the parts do not depend on the shard count: the shards [first, last) it spans. The caller
  // holds the layout (LayoutHold) until it has read them.
  std::pair<size_t, size_t> shards_of_part(size_t i, size_t n) const {
    const LayoutHold hold(*this);
    auto first_hash = [n](size_t k) {  // ceil(k * 2^64 / n), as 128 bits
      return ((static_cast<unsigned __int128>(k) << 64) + n - 1) / n;
    };
    const int shift = 64 - shard_bits_;
    auto shard_at = [&](unsigned __int128 h) { return shard_bits_ ? static_cast<size_t>(h >> shift) : 0; };
    return {shard_at(first_hash(i)), shard_at(first_hash(i + 1) - 1) + 1};
  }
  // The part (of n, as shards_of_part) an id belongs to.
  static size_t part_of(int64_t id, size_t n) {
    return static_cast<size_t>((static_cast<unsigned __int128>(hash_id(id)) * n) >> 64);
  }

  // Calls fn(id, count, older) for the admission filter's counts of shard s (`older`: the
  // count is in the older generation, AdmissionCounts).
  template <class Fn>
  void scan_counts(size_t s, Fn&& fn) const {
    const LayoutHold hold(*this);
    const detail::Shard& sh = *shards_[s];
    std::shared_lock<detail::SharedMutex> lk(sh.mu);
    sh.counts.for_each(fn);
  }

  // Writes entries read from a checkpoint: `data` holds dim + state_dim floats per entry.
  void load_entries(const int64_t* ids, const int64_t* ts, const float* data, size_t n) {
    const detail::ForkGate::InCall in_call;
    load_entries(ids, ts, data, sizeof(float) * (layout_.dim + layout_.state_dim), n);
  }

  // load_entries with entry i's values and state at data + i * stride bytes (a checkpoint's
  // records, read in place).
  void load_entries(const int64_t* ids, const int64_t* ts, const void* data, size_t stride, size_t n) {
    const detail::ForkGate::InCall in_call;
    const size_t bytes = sizeof(float) * (layout_.dim + layout_.state_dim);
    const char* rows = static_cast<const char*>(data);
    const bool far = std::any_of(ts, ts + n, [](int64_t t) { return far_stamp(t); });
    for_each_shard_write(ids, n, kNoTimestamp, detail::BatchRows{rows, stride}, [&](detail::Shard& sh, size_t i, int64_t id, uint64_t h, const Found& known) {
      bool inserted;
      const auto [slot, e] = reach(sh, id, h, known, &inserted);
      if (layout_.narrow) {
        const float* src = reinterpret_cast<const float*>(rows + i * stride);
        write_values(e.values, src);
        std::memcpy(e.values + layout_.value_words, src + layout_.dim, sizeof(float) * layout_.state_dim);
      } else {
        std::memcpy(e.values, rows + i * stride, bytes);
      }
      if (e.meta) e.meta[0] = e.meta[1] = 0;
      sh.stamp(slot, ts[i]);
    }, false, false, false, nullptr, far);
    drop_kept_victims();  // clocks and write counts moved back
    maybe_split();
  }

  // After load_counts: each shard's filter counts within the bound of its generations
  // (AdmissionCounts::fit_bound).
  void fit_counts() {
    const LayoutHold hold(*this);
    for (detail::Shard* sh : shards_) {
      std::unique_lock<detail::SharedMutex> lk(sh->mu);
      sh->counts.fit_bound();
    }
  }

  // Puts admission filter counts into the generations they were saved in (older[i]).
  void load_counts(const int64_t* ids, const uint64_t* counts, const bool* older, size_t n) {
    if (!has_filter_) return;  // a table without a filter keeps no counts (they would never go)
    const LayoutHold hold(*this);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t h = hash_id(ids[i]);
      detail::Shard& sh = *shards_[shard_of(h)];
      std::unique_lock<detail::SharedMutex> lk(sh.mu);
      sh.counts.place(ids[i], h, counts[i], older[i]);
    }
  }

  // Re-initialise values and optimizer state (inserting if new); status 0 inserted, 1 existed.
  void reinitialize(const int64_t* ids, size_t n, int64_t ts, int32_t* status) {
    const WriteHold writing(*this);  // before the fork gate: see WriteHold
    const detail::ForkGate::InCall in_call;
    split_for_batch(n);
    for_each_shard_write(ids, n, kNoTimestamp, detail::BatchRows{}, [&](detail::Shard& sh, size_t i, int64_t id, uint64_t h, const Found& known) {
      bool inserted;
      const auto [slot, e] = reach(sh, id, h, known, &inserted);
      if (inserted && has_filter_) sh.counts.erase(id, h);  // in the table: its count goes, as admit's
      init_row(e.values, id);
      if (e.meta) e.meta[0] = e.meta[1] = 0;
      touch(e);
      sh.stamp(slot, ts);
      status[i] = inserted ? 0 : 1;
    }, false, true, false, nullptr, far_stamp(ts));
    drop_kept_victims();  // write counts moved back
    maybe_split();
  }

 private:
  size_t shard_of(uint64_t h) const { return shard_bits_ ? static_cast<size_t>(h >> (64 - shard_bits_)) : 0; }

  // Whether the shard count is automatic and below its most (a write may ask for a split).
  bool can_split() const { return !fixed_shards_ && shard_bits_ < max_shard_bits_; }

  // The fewest bits b such that `count` items make at most `per_shard` per shard over 2^b.
  static int bits_for(uint64_t count, uint64_t per_shard) {
    int b = 0;
    while ((per_shard << b) < count && b < 62) ++b;
    return b;
  }

  // The entries by the top max_shard_bits_ bits of their hashes: the finest shards the table
  // may have. The caller holds the layout alone.
  std::vector<uint64_t> entries_by_finest_shard() const {
    std::vector<uint64_t> finest(size_t{1} << max_shard_bits_, 0);
    for (const detail::Shard* sh : shards_)
      sh->for_each_run([&](const detail::Shard::Copied* entries, size_t n) {
        for (size_t i = 0; i < n; ++i) ++finest[max_shard_bits_ ? hash_id(entries[i].key) >> (64 - max_shard_bits_) : 0];
      });
    return finest;
  }

  // The entries each shard would hold with 2^bits shards, from entries_by_finest_shard().
  std::vector<uint64_t> entries_per_shard(const std::vector<uint64_t>& finest, int bits) const {
    std::vector<uint64_t> per(size_t{1} << bits, 0);
    for (size_t j = 0; j < finest.size(); ++j) per[j >> (max_shard_bits_ - bits)] += finest[j];
    return per;
  }

  // The fewest shard bits, from the current ones to max_shard_bits_, that leave no shard with
  // more than kSplitEntriesPerShard entries (max_shard_bits_ if none does).
  int bits_for_entries(const std::vector<uint64_t>& finest) const {
    for (int b = shard_bits_; b < max_shard_bits_; ++b) {
      const std::vector<uint64_t> per = entries_per_shard(finest, b);
      if (*std::max_element(per.begin(), per.end()) <= kSplitEntriesPerShard) return b;
    }
    return max_shard_bits_;
  }

  // Each shard's bound on the ids of a generation of filter counts, with `shards` shards: two
  // generations of all shards hold about the filter's capacity.
  uint64_t filter_bound(size_t shards) const {
    const uint64_t capacity = spec_.filter_capacity;
    if (capacity == 0) return detail::AdmissionCounts::kNoBound;
    return std::max<uint64_t>(1, (capacity + 2 * shards - 1) / (2 * shards));
  }

  // Shard s of n (its phase, s / n: see the Shard constructor).
  std::unique_ptr<detail::Shard> new_shard(size_t s, size_t n) const {
    const auto phase_ppm = static_cast<uint32_t>(uint64_t{s} * 1000000 / n);
    return std::make_unique<detail::Shard>(layout_.stride, layout_.with_meta, spec_.max_load_permille, phase_ppm);
  }

  // Cuts every shard into 2^(bits - shard_bits_), by the next bits of the ids' hashes. The
  // caller holds layout_mu_ alone: no batch is under way. The new shards are built whole
  // (their rows copied, the free ones left behind) before the old ones go, so a failed
  // allocation leaves the table as it was; meanwhile the table takes twice its memory, which
  // kSplitEntriesPerShard keeps to tables of at most half a million or so entries. `finest`:
  // entries_by_finest_shard(). The new shards of one old shard are its alone, so the old
  // shards are moved over the pool (move_entries).
  void split_shards(int bits, const std::vector<uint64_t>& finest) {
    const int shift = 64 - bits;
    std::vector<std::unique_ptr<detail::Shard>> fresh(size_t{1} << bits);
    for (size_t i = 0; i < fresh.size(); ++i) fresh[i] = new_shard(i, fresh.size());
    const std::vector<uint64_t> entries = entries_per_shard(finest, bits);
    std::vector<size_t> counted_older(fresh.size(), 0), counted_current(fresh.size(), 0);
    for (const detail::Shard* sh : shards_)
      sh->counts.for_each([&](int64_t id, uint64_t, bool older) {
        ++(older ? counted_older : counted_current)[hash_id(id) >> shift];
      });
    for (size_t i = 0; i < fresh.size(); ++i) {
      fresh[i]->reserve(entries[i]);
      fresh[i]->counts.set_bound(filter_bound(fresh.size()));
      fresh[i]->counts.reserve_placed(counted_older[i], counted_current[i]);
    }
    // The counts keep their generations; a new shard whose current one is over its bound
    // turns it over at the next id it counts.
    ThreadPool::global().parallel_for(shards_.size(), [&](size_t s) {
      const detail::Shard& sh = *shards_[s];
      move_entries(sh, fresh, shift);
      sh.counts.for_each([&](int64_t id, uint64_t count, bool older) {
        const uint64_t h = hash_id(id);
        fresh[h >> shift]->counts.place(id, h, count, older);
      });
    });
    std::vector<detail::Shard*> next(fresh.size());  // the last allocation
    for (size_t i = 0; i < fresh.size(); ++i) next[i] = fresh[i].release();
    for (detail::Shard* sh : shards_) {
      counts_forgotten_before_ += sh->counts.forgotten();
      delete sh;
    }
    shards_.swap(next);
    shard_bits_ = bits;
  }

  // Copies every entry of `from` into the new shard that the top `64 - shift` bits of its
  // hash choose among `to` (split_shards), in index order. Each entry's row and new home
  // bucket are fetched kMoveAhead entries ahead, where one entry after another waited on
  // memory: a split of 590,000 entries from 32 shards to 64 took 71 ms on one thread, 51
  // with the fetches, 29 with the old shards over two threads (C++ loop, medians of 8
  // alternating runs of the two builds).
  void move_entries(const detail::Shard& from, const std::vector<std::unique_ptr<detail::Shard>>& to,
                    int shift) const {
    constexpr size_t kMoveAhead = 16;
    const size_t stride = layout_.stride;
    from.for_each_run([&](const detail::Shard::Copied* moved, size_t n) {
      uint64_t hash[kMoveAhead];
      auto fetch = [&](size_t i) {
        const uint64_t h = hash_id(moved[i].key);
        hash[i % kMoveAhead] = h;
        to[h >> shift]->prefetch_group(h);
        const EntryRef row = from.entry(moved[i].row - 1);
        detail::prefetch_lines(row.values, stride);
        if (row.meta) detail::prefetch(row.meta);
      };
      for (size_t i = 0; i < std::min(n, kMoveAhead); ++i) fetch(i);
      for (size_t i = 0; i < n; ++i) {
        const uint64_t h = hash[i % kMoveAhead];
        if (i + kMoveAhead < n) fetch(i + kMoveAhead);
        detail::Shard& dst = *to[h >> shift];
        bool inserted;
        const Slot slot = dst.find_or_insert(moved[i].key, h, &inserted);
        const EntryRef src = from.entry(moved[i].row - 1), out = dst.entry(slot.row());
        std::memcpy(out.values, src.values, stride);
        if (src.meta) std::memcpy(out.meta, src.meta, 2 * sizeof(uint64_t));
        dst.stamp(slot, from.ts_of(moved[i]));
      }
    });
  }

  using Slot = detail::Shard::Slot;
  using Found = detail::Shard::Found;

  // Capacity bookkeeping: the write clock and the number of writes of an entry.
  void touch(const EntryRef& e) const {
    if (!e.meta) return;
    e.meta[0] = write_clock_.load(std::memory_order_relaxed);
    ++e.meta[1];
  }

 public:
  // Whether a write stamping `ts` needs room for timestamps kept apart (Shard::stamp).
  static bool far_stamp(int64_t ts) { return detail::Shard::near_ts(ts) == detail::kTsApart; }

  // Reserve room for the new ids of a batch and hold it, changing nothing visible: a
  // multi-table write calls it for every table before it changes the first one. Returns the
  // batch's plan and the room (held until it is destroyed), for the write to use
  // (apply_gradient_rows).
  // `victims`: the entries the write evicts, if the caller chose them (victims_for); the
  // room they leave counts as room for the write's new entries. The write goes through the
  // admission filter. `one_thread`: the caller writes it on the calling thread alone (a task
  // of its own), so that it is planned as a write on one thread is.
  // `runs`: the write is deduplicated (group_runs groups it).
  detail::PlannedWrite reserve_ids(const int64_t* ids, size_t n, std::optional<detail::Victims> victims = {},
                                   bool far_stamps = false, bool one_thread = false, bool runs = false) {
    const LayoutHold hold(*this);
    const size_t chunks = one_thread ? 1 : write_chunks(n);
    if (chunks == 1 && !spec_.max_entries && (!runs || threads_for(n) == 1)) {
      // Written in input order (for_each_shard_write: one chunk, and no capacity limit, so
      // no victims; deduplicated, a batch small enough to be grouped in input order, as a
      // write to one table is), which needs of the plan only the shards the ids fall in.
      const detail::ScratchBlock block(sizeof(uint64_t) * n);
      detail::ScratchArray<uint64_t> hashes(block.data());
      std::vector<uint64_t> count(shards_.size(), 0);
      for (size_t i = 0; i < n; ++i) ++count[shard_of(hashes[i] = hash_id(ids[i]))];
      detail::PlannedWrite planned{detail::BatchPlan(count), detail::HeldRoom(shards_.size()), 1, {}, std::move(victims)};
      reserve_in_order(ids, hashes.data(), n, count, planned.room, true, far_stamps);
      return planned;
    }
    detail::PlannedWrite planned{detail::BatchPlan(ids, n, shard_bits_), detail::HeldRoom(shards_.size()), chunks, {},
                                 std::move(victims)};
    for (size_t s = 0; s < shards_.size(); ++s)
      reserve_shard(planned.plan, s, planned.room, true, planned.victims ? planned.victims->by_shard[s].size() : 0,
                    far_stamps);
    return planned;
  }

  // With a capacity limit, the entries a write of these ids would evict (nothing without
  // one); `runs` as for check_room. The caller holds lock_capacity() and lets no other write
  // come to the table before this one (which would make the choice stale). Throws, changing
  // nothing, when the write cannot fit.
  std::optional<detail::Victims> victims_for(const int64_t* ids, size_t n, bool runs) {
    if (!spec_.max_entries) return std::nullopt;
    detail::Victims victims;
    choose_victims(ids, n, runs, true, true, victims);
    return victims;
  }

  // Groups the ids of a planned deduplicated write and sums their rows (see detail::Runs),
  // so that the write itself allocates nothing: `ids` those given to reserve_ids,
  // row(position) as for apply_gradient_rows. A plan of counts alone is grouped in input
  // order (Runs::group_in_order).
  template <class Row>
  void group_runs(detail::PlannedWrite& planned, const int64_t* ids, const uint32_t* blocks, Row&& row) const {
    const LayoutHold hold(*this);
    if (!planned.plan.ordered()) {
      planned.runs.resize(1);
      planned.runs[0].group_in_order(ids, planned.plan.shard_begin.back(), static_cast<size_t>(layout_.dim), row,
                                     blocks);
      return;
    }
    planned.runs.resize(planned.chunks);
    for (size_t i = 0; i < planned.chunks; ++i) {
      const auto [first, last] = chunk_shards(i, planned.chunks);
      planned.runs[i].group(planned.plan, first, last, blocks, static_cast<size_t>(layout_.dim), row);
    }
  }

  void check_learning_rates(const float* lrs, size_t n_lrs) const {
    if (n_lrs != layout_.segments.size())
      throw ValueError("expected " + std::to_string(layout_.segments.size()) + " learning rates (one per segment), got " +
                       std::to_string(n_lrs));
    for (size_t k = 0; k < n_lrs; ++k)
      if (!std::isfinite(lrs[k])) throw ValueError("learning rate is not finite");
  }

  void check_step(int64_t global_step) const {
    if (needs_step_ && global_step < 0)
      throw ValueError("global_step must be >= 0 for a batch_softmax segment, got " + std::to_string(global_step));
  }

  // Throws ValueError if any value is NaN or Inf, unless the table allows them.
  void check_finite(const float* v, size_t count, const char* what) const {
    if (spec_.allow_non_finite) return;
    // Blocks are tested by the kernel set's all_finite (vectorised at the CPU's width), ranges
    // of them in parallel, and the culprit is looked for only when a block fails. The first
    // culprit is reported, whatever the thread count.
    constexpr size_t kFloats = 1024;  // tested at a time
    const size_t parts = detail::range_parts(count / 16);
    std::vector<size_t> first_bad(parts, count);
    detail::for_ranges(count, parts, [&](size_t p, size_t lo, size_t hi) {
      for (size_t start = lo; start < hi; start += kFloats) {
        const size_t end = std::min(hi, start + kFloats);
        if (kernels_->all_finite(v + start, end - start)) continue;
        for (size_t k = start; k < end; ++k)
          if (!std::isfinite(v[k])) {
            first_bad[p] = k;
            return;
          }
      }
    });
    const size_t k = *std::min_element(first_bad.begin(), first_bad.end());
    if (k < count)
      throw ValueError(std::string(what) + " contain NaN or Inf (row " + std::to_string(k / layout_.dim) +
                       "); set allow_non_finite=True in the table config to accept them");
  }

 private:
  void init_row(float* row, int64_t id) const {
    if (layout_.narrow) init_narrow_row(row, id);
    else init_values(row, row + layout_.value_words, id);
  }
  void init_values(float* w, float* st, int64_t id) const {
    for (size_t k = 0; k < layout_.segments.size(); ++k)
      init_segment(layout_.segments[k], w + layout_.value_offset[k], st + layout_.state_offset[k], spec_.random_seed,
                   id, layout_.value_offset[k]);
  }

  // The paths of values kept in 16 bits: the values widened into a float32 copy on the
  // stack (with_stack_floats), changed there, and rounded back.
  void init_narrow_row(float* row, int64_t id) const {
    with_stack_floats(static_cast<size_t>(layout_.dim), [&](float* w) {
      init_values(w, row + layout_.value_words, id);
      write_values(row, w);
    });
  }
  // Rounded to nearest: an assign_add is not an optimizer step.
  void add_narrow_row(float* row, const float* v) const {
    const size_t d = static_cast<size_t>(layout_.dim);
    with_stack_floats(d, [&](float* w) {
      read_values(row, w);
      for (size_t j = 0; j < d; ++j) w[j] += v[j];
      write_values(row, w);
    });
  }
  // One buffer holds the widened values and, after them, HashNet's gradient (spec.h bounds
  // the two together), so that a thread of 32 KiB runs it.
  void step_narrow_row(float* row, int64_t id, const float* g, const float* lrs, int64_t global_step,
                       uint64_t step_seed) const {
    if (narrow_step_ && narrow_step_(layout_.segments[0], reinterpret_cast<uint16_t*>(row), row + layout_.value_words,
                                     g, lrs[0], global_step, stochastic_key(step_seed, id)))
      return;
    const size_t d = static_cast<size_t>(layout_.dim);
    with_stack_floats(d + widest_one_bit_, [&](float* w) {
      read_values(row, w);
      step_values(w, row + layout_.value_words, id, g, lrs, global_step, w + d);
      kernels_->narrow_stochastic[narrow_index(layout_.value_format)](
          w, reinterpret_cast<uint16_t*>(row), d, stochastic_key(step_seed, id));
    });
    if (bfloat16_wrapped_) keep_float16_range(reinterpret_cast<uint16_t*>(row));
  }
  // The float16 wrapper saturates at 65504, which bfloat16 does not hold: its rounding may
  // take the value to 65536, which float16 does not (a serving export made it Inf). Such a
  // value is kept at 65280, the largest that both formats hold.
  void keep_float16_range(uint16_t* row) const {
    constexpr uint16_t kLargestInBoth = 0x477F, kInf = 0x7F80;  // bfloat16 bits of 65280 and Inf
    for (size_t k = 0; k < layout_.segments.size(); ++k) {
      if (!layout_.segments[k].stochastic_rounding_fp16) continue;
      uint16_t* v = row + layout_.value_offset[k];
      for (int j = 0; j < layout_.segments[k].dim; ++j) {
        const uint16_t magnitude = v[j] & 0x7FFF;
        if (magnitude > kLargestInBoth && magnitude < kInf)  // Inf and NaN pass, as the wrapper passes them
          v[j] = static_cast<uint16_t>((v[j] & 0x8000) | kLargestInBoth);
      }
    }
  }

  // A row's values as float32, into out[0, dim).
  void read_values(const float* row, float* out) const {
    if (layout_.narrow)
      kernels_->widen[narrow_index(layout_.value_format)](reinterpret_cast<const uint16_t*>(row), out,
                                                          static_cast<size_t>(layout_.dim));
    else std::memcpy(out, row, layout_.value_bytes());
  }
  // Sets a row's values to v[0, dim) (rounded to nearest when kept in 16 bits).
  void write_values(float* row, const float* v) const {
    if (layout_.narrow)
      kernels_->narrow[narrow_index(layout_.value_format)](v, reinterpret_cast<uint16_t*>(row),
                                                           static_cast<size_t>(layout_.dim));
    else std::memcpy(row, v, layout_.value_bytes());
  }

  // The row of `id` for a write of `occurrences` occurrences, or null when the admission
  // filter keeps an absent id out. An id already in the table is never filtered; an absent
  // one is admitted once `threshold` occurrences were seen before (exact counts).
  // `known`: where the write found the id before (write_blocks), if it did.
  Found admit(detail::Shard& sh, int64_t id, uint64_t h, uint64_t occurrences, const Found& known) const {
    if (!has_filter_ || known.slot.bucket) return upsert(sh, id, h, known);
    const uint32_t threshold = thresholds_.of(id);
    if (threshold > 0 && !sh.find(id, h).bucket) {
      uint64_t* count = sh.counts.enter(id, h);
      const uint64_t before = *count;
      if (before < threshold) {
        *count = before + occurrences;
        return Found{};
      }
      sh.counts.erase(id, h);  // admitted: the entry itself now stands for the id
    }
    return upsert(sh, id, h, known);
  }

  Found upsert(detail::Shard& sh, int64_t id, uint64_t h, const Found& known) const {
    bool inserted;
    const Found found = reach(sh, id, h, known, &inserted);
    if (inserted) {
      init_row(found.entry.values, id);
      if (found.entry.meta) found.entry.meta[0] = found.entry.meta[1] = 0;
    }
    touch(found.entry);
    return found;
  }

  // The entry of `id` for a write: `known` when the write found it before (write_blocks),
  // else found or inserted now (a new row for the caller to initialise: *inserted).
  static Found reach(detail::Shard& sh, int64_t id, uint64_t h, const Found& known, bool* inserted) {
    *inserted = false;
    if (known.slot.bucket) return known;
    const Slot slot = sh.find_or_insert(id, h, inserted);
    return Found{slot, sh.entry(slot.row())};
  }

  // Retriever backward (one_bit), the segment's optimizer, then stochastic rounding. Values
  // kept in 16 bits are stepped in float32 and rounded back stochastically.
  // `step_seed`: stochastic_step_seed(random_seed, global_step).
  void step_row(float* row, int64_t id, const float* g, const float* lrs, int64_t global_step,
                uint64_t step_seed) const {
    if (layout_.narrow) step_narrow_row(row, id, g, lrs, global_step, step_seed);
    else step_values(row, row + layout_.value_words, id, g, lrs, global_step);
  }

  // `hashnet_scratch`: room for the widest one_bit segment's gradient, or null (then it
  // takes a stack buffer of its own).
  void step_values(float* w, float* st, int64_t id, const float* g, const float* lrs, int64_t global_step,
                   float* hashnet_scratch = nullptr) const {
    for (size_t k = 0; k < layout_.segments.size(); ++k) {
      const SegmentSpec& seg = layout_.segments[k];
      const int off = layout_.value_offset[k];
      float* wk = w + off;
      float* sk = st + layout_.state_offset[k];
      if (static_cast<RetrieverKind>(seg.retriever) == RetrieverKind::kHashNet) {
        // The gradient through HashNet's forward, on a frame of its own (kept out of the
        // loops of the other segments, which inline this).
        auto step_through = [&](float* scratch) {
          const float scale = hashnet_scale_[k].load(std::memory_order_relaxed);
          kernels_->hashnet_backward_row(wk, g + off, scratch, seg.dim, scale, seg.hashnet_amplitude);
          steps_[k](seg, wk, sk, scratch, lrs[k], global_step);
        };
        if (hashnet_scratch) step_through(hashnet_scratch);
        else with_stack_floats(static_cast<size_t>(seg.dim), step_through);
      } else {
        steps_[k](seg, wk, sk, g + off, lrs[k], global_step);
      }
      if (seg.stochastic_rounding_fp16) stochastic_round_segment(wk, seg.dim, spec_.random_seed, id, global_step, off);
    }
  }

  // fn(buffer) with a buffer of at least n (<= kMaxNarrowDim) floats on the stack, of one of
  // a few sizes, each in a function of its own: the caller's frame holds none of them, and
  // a thread with a small stack (Python lets one have 32 KiB) needs only what n takes.
  template <class Fn>
  static void with_stack_floats(size_t n, Fn&& fn) {
    if (n <= 64) on_stack_floats<64>(fn);
    else if (n <= 256) on_stack_floats<256>(fn);
    else if (n <= 1024) on_stack_floats<1024>(fn);
    else on_stack_floats<kMaxNarrowDim>(fn);
  }
  template <size_t N, class Fn>
  __attribute__((noinline)) static void on_stack_floats(Fn& fn) {
    float buffer[N];
    fn(buffer);
  }

  // What a lookup returns, for a table with a retriever that is not raw: the values of
  // `values` (a row's, or already in `out`), each segment through its retriever, to `out`.
  void retrieve(const float* values, float* out) const {
    for (size_t k = 0; k < layout_.segments.size(); ++k) {
      const SegmentSpec& seg = layout_.segments[k];
      const float* src = values + layout_.value_offset[k];
      float* dst = out + layout_.value_offset[k];
      switch (static_cast<RetrieverKind>(seg.retriever)) {
        case RetrieverKind::kRaw:
          if (src != dst) std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(seg.dim));
          break;
        case RetrieverKind::kFakeQuant:
          kernels_->fake_quantize_row(src, dst, seg.dim, seg.fake_quant_range);
          break;
        case RetrieverKind::kHashNet: {
          const float scale = hashnet_scale_[k].load(std::memory_order_relaxed);
          kernels_->hashnet_forward_row(src, dst, seg.dim, scale, seg.hashnet_amplitude);
          break;
        }
      }
    }
  }

  // HashNet's table-wide scale moves at every multiple of its step size (before the step).
  void update_hashnet_scales(int64_t t) {
    if (!has_hashnet_) return;
    for (size_t k = 0; k < layout_.segments.size(); ++k) {
      const SegmentSpec& seg = layout_.segments[k];
      if (static_cast<RetrieverKind>(seg.retriever) == RetrieverKind::kHashNet && t >= 0 &&
          t % seg.hashnet_step_size == 0)
        hashnet_scale_[k].store(hashnet_scale(seg.hashnet_init_scale, seg.hashnet_max_scale, t));
    }
  }


  void note_ts(int64_t ts) {
    if (ts == kNoTimestamp) return;
    int64_t cur = max_update_ts_.load();
    while (ts > cur && !max_update_ts_.compare_exchange_weak(cur, ts)) {
    }
  }

  // Reads change nothing, so unlike a write a read batch need not give each shard to one
  // thread, nor be grouped by shard: it is cut into consecutive ranges (ReadPieces), each
  // read in input order (read_spans). Calls fn(b, e) for the ranges [b, e) on the pool.
  template <class Fn>
  void for_each_read_range(size_t n, Fn&& fn) const {
    if (n == 0) return;
    const detail::ReadPieces pieces({n}, batch_threads(n));
    ThreadPool::global().parallel_for(pieces.size(), [&](size_t i) { fn(pieces.begin(i), pieces.end(i)); });
  }

  // Calls fn(position, slot, row) for every id: its slot and the start of its row, or a
  // null slot and row when it is missing.
  template <class Fn>
  void for_each_shard_read(const int64_t* ids, size_t n, Fn&& fn) const {
    for_each_read_range(n, [&](size_t b, size_t e) {
      const IdSpan span{ids + b, e - b};
      read_spans(&span, 1, [&](size_t, size_t i, detail::Shard::Slot slot, const float* row) { fn(b + i, slot, row); });
    });
  }

  // Shared locks on the shards of the ids of spans[0, count), `total` ids (on all of them
  // when there are enough ids to touch most shards, which spares hashing them a second
  // time), taken in increasing order as every batch takes its locks, and released when this
  // is destroyed.
  class SharedShardLocks {
   public:
    // Ids per shard from which a read locks every shard: twice as many ids as shards touch
    // 86% of the shards, and locking the rest cost less than hashing the ids to find them
    // (C++ loop, 64 shards, one thread: lookups of 1,000 ids 12.8 -> 11.8 us, of 200 ids
    // 2.83 -> 2.67 us, against a bound of 16 ids per shard).
    static constexpr size_t kLockAllIdsPerShard = 2;

    SharedShardLocks(const EmbeddingTable& table, const IdSpan* spans, size_t count, size_t total)
        : shards_(table.shards_), marked_((shards_.size() + 63) / 64, 0) {
      if (total >= kLockAllIdsPerShard * shards_.size()) {
        std::fill(marked_.begin(), marked_.end(), ~uint64_t{0});
        if (shards_.size() < 64) marked_[0] = (uint64_t{1} << shards_.size()) - 1;
      } else {
        for (size_t q = 0; q < count; ++q)
          for (size_t i = 0; i < spans[q].n; ++i) {
            const size_t s = table.shard_of(hash_id(spans[q].ids[i]));
            marked_[s / 64] |= uint64_t{1} << (s % 64);
          }
      }
      for (size_t s = 0; s < shards_.size(); ++s) {
        if (!marked(s)) continue;
        try {
          shards_[s]->mu.lock_shared();
        } catch (...) {
          unlock_below(s);
          throw;
        }
      }
    }
    ~SharedShardLocks() { unlock_below(shards_.size()); }
    SharedShardLocks(const SharedShardLocks&) = delete;
    SharedShardLocks& operator=(const SharedShardLocks&) = delete;

   private:
    bool marked(size_t s) const { return (marked_[s / 64] >> (s % 64)) & 1; }
    void unlock_below(size_t end) {
      for (size_t s = 0; s < end; ++s)
        if (marked(s)) shards_[s]->mu.unlock_shared();
    }
    const std::vector<detail::Shard*>& shards_;
    std::vector<uint64_t> marked_;
  };

  // Reads the ids of spans[0, count) in order: use(span, position in the span, slot, row)
  // for each (a null slot and row for a missing id), in pieces of at most kReadPiece ids (parts of one or
  // more spans), each under shared locks of its shards (so that a long read does not keep
  // writers out for long). The ids go through the four stages of visit_blocks without
  // being grouped by shard first: the index does not care about order, and the caller's
  // rows are then written in order, a stream of stores rather than stores at random (1M
  // ids, dim 16, one thread, C++ loop: lookups 19.4-19.6 -> 16.4-17.0 ns per id, Zipf ids
  // 16.9-18.0 -> 15.0-16.6).
  template <class Use>
  void read_spans(const IdSpan* spans, size_t count, Use&& use) const {
    const LayoutHold hold(*this);
    constexpr size_t kReadPiece = 16384;
    std::vector<IdSpan> parts;   // the parts of spans in one piece
    std::vector<size_t> span_of, first_of;  // each part's span and first position in it
    size_t s = 0, o = 0;  // the next id to read: position o of span s
    while (s < count) {
      parts.clear();
      span_of.clear();
      first_of.clear();
      size_t total = 0;
      for (; s < count && total < kReadPiece; o = 0, ++s) {
        const size_t take = std::min(spans[s].n - o, kReadPiece - total);
        if (take) {
          parts.push_back({spans[s].ids + o, take});
          span_of.push_back(s);
          first_of.push_back(o);
          total += take;
        }
        if (o + take < spans[s].n) {  // the piece is full inside span s
          o += take;
          break;
        }
      }
      if (total == 0) continue;
      const SharedShardLocks locks(*this, parts.data(), parts.size(), total);
      for (size_t q = 0; q < parts.size(); ++q) {
        const size_t span = span_of[q], first = first_of[q];
        read_blocks(parts[q].ids, parts[q].n, [&](size_t i, detail::Shard::Slot slot, const float* row) {
          use(span, first + i, slot, row);
        });
      }
    }
  }

  // Items per block of visit_blocks and read_blocks, from 2 to kMaxBlock: a block is how far
  // ahead of its use each fetch is made, and a longer distance hid less of the memory's
  // latency, not more (1M ids, one thread, C++ loop, blocks of 16 / 8 / 4 / 2 items: dim-16
  // Adagrad steps 11.8 / 15.5 / 20.5 / 15.6 M ids/s, dim-16 lookups 33.8 / 41.1 / 31.7 /
  // 21.7, dim-64 steps 5.8 / 5.2 / 6.0 / 7.3). So a block holds about kFetchesAhead fetches:
  // an item fetches its bucket and its row (and a write the caller's row), each one fetch
  // plus half of one for every further line, as adjacent lines come cheaper.
  // MTHT_FETCHES_AHEAD (read each time a table is built) sets another number of fetches, for
  // machines that differ.
  static constexpr size_t kMaxBlock = 16, kRing = 4 * kMaxBlock, kFetchesAhead = 16;
  static size_t half_fetches(size_t bytes) { return bytes ? 1 + (bytes + 63) / 64 : 0; }
  size_t block_for(size_t half_fetches_per_item) const {
    const size_t h = half_fetches_per_item;
    return std::clamp<size_t>((2 * fetches_ahead_ + h / 2) / h, 2, kMaxBlock);
  }
  static size_t fetches_ahead_from_env() {
    const char* env = std::getenv("MTHT_FETCHES_AHEAD");
    if (!env || !*env) return kFetchesAhead;
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 1 || v > 256)
      throw ValueError(std::string("MTHT_FETCHES_AHEAD=") + env + " must be a whole number from 1 to 256");
    return static_cast<size_t>(v);
  }

  // Where the ids of the last blocks of a read were found, between stages 2 and 4 of
  // read_blocks: stage 2 looks in the home bucket (at_home), stage 3 further on when the id
  // may lie there, finds its row and prefetches the row's first `bytes` (prefetch_row), so
  // that neither matches the home bucket again and stage 4 need not find the row again.
  // Slots and rows stay valid to stage 4: the shard is held all along, and a read changes
  // nothing.
  struct Located {
    detail::Shard::Slot slot[kRing];
    const float* row[kRing];
    bool further[kRing];
    void at_home(const detail::Shard& sh, size_t k, int64_t id, uint64_t h) {
      slot[k % kRing] = sh.find_at_home(id, h, &further[k % kRing]);
    }
    // Returns whether the id is stored.
    bool prefetch_row(const detail::Shard& sh, size_t k, int64_t id, uint64_t h, size_t bytes) {
      detail::Shard::Slot& s = slot[k % kRing];
      if (further[k % kRing]) s = sh.find(id, h);
      const float* r = s.bucket ? sh.entry(s.row()).values : nullptr;
      row[k % kRing] = r;
      if (r) detail::prefetch_lines(r, bytes);
      return r != nullptr;
    }
  };

  // The same for a write, whose stage 4 is then handed the entry (known), so that it need
  // not find the id nor its row again (dim-16 Adagrad steps of 8,192 ids on a table in
  // cache, callgrind: 561 -> 494 instructions an id; 1M ids, C++ loop, one thread, medians
  // of 7 alternating runs: 16.9 -> 17.6 M ids/s). An insert by stage 4 of the same batch
  // can still rewrite the index (when an id counted present while its room was reserved has
  // been removed since), which frees the buckets a slot points into: a slot is handed on
  // only while the shard's index_version is the one it was found at. Rows never move. An id
  // not found is found or inserted by stage 4 (an earlier occurrence in the batch may have
  // inserted it since).
  struct LocatedRows {
    detail::Shard::Found found[kRing];  // a null bucket when not (yet) found
    uint32_t version[kRing];            // the shard's index_version when found[] was looked for
    bool further[kRing];
    void at_home(const detail::Shard& sh, size_t k, int64_t id, uint64_t h) {
      found[k % kRing].slot = sh.find_at_home(id, h, &further[k % kRing]);
      version[k % kRing] = sh.index_version();
    }
    // Returns whether the id is stored.
    bool prefetch_row(const detail::Shard& sh, size_t k, int64_t id, uint64_t h, size_t bytes) {
      detail::Shard::Found& f = found[k % kRing];
      if (further[k % kRing] || version[k % kRing] != sh.index_version()) {
        f.slot = sh.find(id, h);
        version[k % kRing] = sh.index_version();
      }
      if (!f.slot.bucket) return false;
      // With a capacity limit, the write also stamps the row's bookkeeping (touch), which
      // lives apart: 1M ids, Adagrad steps of 65,536, 8.9 ms a batch without this fetch.
      f.entry = sh.entry(f.slot.row());
      detail::prefetch_lines(f.entry.values, bytes);
      if (f.entry.meta) detail::prefetch(f.entry.meta);
      return true;
    }
    // What stage 4 may take as found.
    detail::Shard::Found known(const detail::Shard& sh, size_t k) const {
      const detail::Shard::Found& f = found[k % kRing];
      return f.slot.bucket && version[k % kRing] == sh.index_version() ? f : detail::Shard::Found{};
    }
  };

  // The four stages of visit_blocks (see there), over ids[0, n) in input order (the caller
  // holds the shards' locks): stage 1 hashes each id and prefetches its home bucket, stage 2 looks for it
  // there, stage 3 further on (when it may lie there) and prefetches the row's first
  // read_bytes_; stage 4 is use(position, slot, row). The blocks are sized by the rows the
  // last block found: an absent id fetches no row, and a lookup of absent ids keeps more of
  // them ahead (`mtht-bench --ops=lookup_missing`, 1M ids, dim 16, one thread, five
  // alternating runs: 55.6 M ids/s in blocks of 8, 68.3 in blocks of 16).
  template <class Use>
  void read_blocks(const int64_t* ids, size_t n, Use&& use) const {
    constexpr size_t R = kRing;
    const size_t row_fetches = half_fetches(read_bytes_);
    const detail::Shard* shard[R];
    uint64_t hash[R];
    Located found;
    size_t K = read_block_;
    // Blocks [at2, b), [at3, at2), [at4, at3) are at stages 2, 3 and 4; [b, e) enters stage 1.
    size_t b = 0, at2 = 0, at3 = 0, at4 = 0;
    while (at4 < n) {
      const size_t e = std::min(n, b + K);
      for (size_t k = b; k < e; ++k) {
        const uint64_t h = hash_id(ids[k]);
        shard[k % R] = shards_[shard_of(h)];
        hash[k % R] = h;
        shard[k % R]->prefetch_group(h);
      }
      for (size_t k = at2; k < b; ++k) found.at_home(*shard[k % R], k, ids[k], hash[k % R]);
      if (at3 < at2) {
        size_t rows = 0;
        for (size_t k = at3; k < at2; ++k)
          rows += found.prefetch_row(*shard[k % R], k, ids[k], hash[k % R], read_bytes_);
        const size_t m = at2 - at3;
        K = block_for(2 + (rows * row_fetches + m / 2) / m);
      }
      for (size_t k = at4; k < at3; ++k) use(k, found.slot[k % R], found.row[k % R]);
      at4 = at3;
      at3 = at2;
      at2 = b;
      b = e;
    }
  }

  // The loop of every write batch: items [begin[first], begin[last]) (item k belongs to
  // shard s when begin[s] <= k < begin[s + 1]: plan positions, or runs of a deduplicated
  // write) go through four stages, each a short loop over a block of K items (write_block_,
  // see block_for), a block apart: stage1(shard, k) prefetches the home bucket; stage2 the
  // next bucket when the id may lie past home (the home bucket has arrived); stage3 the row
  // (the buckets have arrived); stage4 does the work. A shard is
  // locked (exclusively) when stage 1 reaches its first item and unlocked after stage 4 has
  // done its last: in increasing order, at most kRing shards at a time. Short loops let the
  // processor run far ahead of a stage that waits; the loop this replaced did all stages for
  // one item at a time (for items 24, 16 and 8 ahead), with many more instructions between
  // its misses: 1M ids, dim 16, one thread, medians of alternating runs of the Python
  // benchmark: lookups 36.7 -> 49.9 M ids/s, Adagrad steps 26.7 -> 30.2. On the machine of
  // those runs, blocks of 8 items were 5 to 25% slower than 16 (and 32 up to 10% slower on
  // writes); on a later one, whose memory answered in 164 ns, 16 was the slowest (block_for).
  template <class S1, class S2, class S3, class S4>
  void visit_blocks(const size_t* begin, size_t first, size_t last, size_t K, S1&& stage1, S2&& stage2, S3&& stage3,
                    S4&& stage4) {
    constexpr size_t R = kRing;
    const size_t lo = begin[first], hi = begin[last];
    if (lo == hi) return;
    std::unique_lock<detail::SharedMutex> held[R];  // a ring, in the order taken
    size_t n_locked = 0, n_unlocked = 0;
    // Calls f(shard number, shard, b, e) for the parts [b, e) of [from, to) in one shard
    // each; s: the stage's shard so far.
    auto in_shards = [&](size_t& s, size_t from, size_t to, auto&& f) {
      while (from < to) {
        while (begin[s + 1] <= from) ++s;
        const size_t stop = std::min(to, begin[s + 1]);
        f(s, *shards_[s], from, stop);
        from = stop;
      }
    };
    // The shard of item k, at k % R, for stages 2 and 3, which need no shard bounds: walking
    // them there too cost 1.2 of 9.2 us in a 200-id Adagrad step over 64 shards.
    detail::Shard* at[R];
    size_t s1 = first, s4 = first;
    in_stages(lo, hi, K, at,
              [&](size_t b, size_t e) {
                in_shards(s1, b, e, [&](size_t s, detail::Shard& sh, size_t k, size_t stop) {
                  if (k == begin[s]) held[n_locked++ % R] = std::unique_lock<detail::SharedMutex>(sh.mu);
                  for (; k < stop; ++k) {
                    at[k % R] = &sh;
                    stage1(sh, k);
                  }
                });
              },
              stage2, stage3,
              [&](size_t b, size_t e) {
                in_shards(s4, b, e, [&](size_t s, detail::Shard& sh, size_t k, size_t stop) {
                  for (; k < stop; ++k) stage4(sh, k);
                  if (stop == begin[s + 1]) held[n_unlocked++ % R].unlock();
                });
              });
  }

  // The schedule of visit_blocks and visit_in_order: items [lo, hi) go through four stages,
  // each a loop over a block of K items, a block apart. enter(b, e) is stage 1 of block
  // [b, e): it sets at[k % kRing] to item k's shard, for stages 2 and 3, which call
  // stage2(shard, k) and stage3(shard, k); leave(b, e) is stage 4 of the block. Inlined:
  // called out of line, one-thread writes in input order ran 1.5% slower (C++ loop).
  template <class Enter, class S2, class S3, class Leave>
  [[gnu::always_inline]] static void in_stages(size_t lo, size_t hi, size_t K, detail::Shard* const* at,
                                               Enter&& enter, S2&& stage2, S3&& stage3, Leave&& leave) {
    constexpr size_t R = kRing;
    for (size_t b = lo; b < hi + 3 * K; b += K) {
      if (b < hi) enter(b, std::min(b + K, hi));
      if (b >= lo + K && b - K < hi)
        for (size_t k = b - K, e = std::min(b, hi); k < e; ++k) stage2(*at[k % R], k);
      if (b >= lo + 2 * K && b - 2 * K < hi)
        for (size_t k = b - 2 * K, e = std::min(b - K, hi); k < e; ++k) stage3(*at[k % R], k);
      if (b >= lo + 3 * K && b - 3 * K < hi) leave(b - 3 * K, std::min(b - 2 * K, hi));
    }
  }

  // A write of items [begin[first], begin[last]) (plan positions, or runs of a deduplicated
  // write: item k stands for plan position at(k)): fn(shard, k, known) for each, with the row
  // (layout_.stride bytes, when the id is already stored) and, through ahead(k), the
  // batch's own data for it prefetched first; `known`: the id's entry, if it was found.
  // The batch's data is reached at random in the plan's order, and is fetched a block
  // before the entry's row (in stage 2): 1M ids, dim-16 Adagrad steps, C++ loop,
  // alternating batches: two threads 1.05x, deduplicated steps 1.06x to 1.07x on one
  // thread and 1.04x to 1.05x on two, against fetching it with the row.
  template <class At, class Fn, class Ahead>
  void write_blocks(const detail::BatchPlan& plan, const size_t* begin, size_t first, size_t last, At&& at, Fn&& fn,
                    Ahead&& ahead) {
    const int64_t* keys = plan.keys.data();
    const uint64_t* hashes = plan.hashes.data();
    write_stages([&](size_t k) { return keys[at(k)]; }, [&](size_t k) { return hashes[at(k)]; }, fn, ahead,
                 [&](auto&&... stages) { visit_blocks(begin, first, last, write_block_, stages...); });
  }

  // The stages of a write (visit_blocks) over items whose ids and hashes are key(k) and
  // hash(k), visited by visit(stage1, stage2, stage3, stage4); ahead(k) prefetches the
  // batch's own data in stage 2.
  template <class Key, class Hash, class Fn, class Ahead, class Visit>
  void write_stages(Key&& key, Hash&& hash, Fn&& fn, Ahead&& ahead, Visit&& visit) {
    const size_t row_bytes = layout_.stride;
    LocatedRows found;
    const bool counting = has_filter_;  // an absent id is counted by the admission filter
    visit([&](const detail::Shard& sh, size_t k) { sh.prefetch_group(hash(k)); },
          [&](const detail::Shard& sh, size_t k) {
            found.at_home(sh, k, key(k), hash(k));
            ahead(k);
          },
          [&](const detail::Shard& sh, size_t k) {
            const uint64_t h = hash(k);
            if (!found.prefetch_row(sh, k, key(k), h, row_bytes) && counting) sh.counts.prefetch(h);
          },
          [&](detail::Shard& sh, size_t k) { fn(sh, k, found.known(sh, k)); });
  }

  // visit_blocks over ids [0, n) in input order, the caller holding the locks of their
  // shards; shard(k): id k's shard.
  template <class ShardOf, class S1, class S2, class S3, class S4>
  void visit_in_order(size_t n, size_t K, ShardOf&& shard, S1&& stage1, S2&& stage2, S3&& stage3, S4&& stage4) {
    detail::Shard* at[kRing];
    in_stages(0, n, K, at,
              [&](size_t b, size_t e) {
                for (size_t k = b; k < e; ++k) {
                  at[k % kRing] = shards_[shard(k)];
                  stage1(*at[k % kRing], k);
                }
              },
              stage2, stage3,
              [&](size_t b, size_t e) {
                for (size_t k = b; k < e; ++k) stage4(*at[k % kRing], k);
              });
  }

  // A plain write on one thread (no plan given, no victims): the ids in input order, every
  // shard they touch held meanwhile. The plan's shard-by-shard order reaches the caller's
  // rows at random; input order reads them one after the other (1M ids, dim-16 Adagrad
  // steps, C++ loop, alternating batches: 1.14x to 1.17x). On several threads, each taking
  // a run of shards, the plan stays faster: a run's ids in input order lost 1.08x to 1.12x
  // against it, keeping a shard's entries together counting for more than the caller's rows.
  template <class Fn>
  void write_in_order(const int64_t* ids, size_t n, int64_t ts, bool gated, bool far_stamps, Fn&& fn) {
    const detail::ScratchBlock block(sizeof(uint64_t) * n);
    detail::ScratchArray<uint64_t> hashes(block.data());
    for (size_t i = 0; i < n; ++i) hashes[i] = hash_id(ids[i]);
    write_in_order(ids, hashes.data(), n, ts, gated, far_stamps, fn, [](size_t) {});
  }
  // The same with the ids' hashes given, and ahead(k) prefetching what fn will read of
  // the batch's own data for id k, where that is not in order.
  template <class Fn, class Ahead>
  void write_in_order(const int64_t* ids, const uint64_t* hashes, size_t n, int64_t ts, bool gated, bool far_stamps,
                      Fn&& fn, Ahead&& ahead) {
    std::vector<uint64_t> count(shards_.size(), 0);
    for (size_t i = 0; i < n; ++i) ++count[shard_of(hashes[i])];
    detail::HeldRoom room(shards_.size());
    reserve_in_order(ids, hashes, n, count, room, gated, far_stamps);
    write_held_in_order(ids, hashes, n, ts, [&](size_t s) { return count[s] != 0; }, fn, ahead);
  }

  // A planned write (reserve_ids: its room held, its plan made for one thread) in input
  // order, as write_in_order: the plan only counted the ids and reserved room. Its ids are
  // hashed again as they come (the plan's hashes are in shard order).
  template <class Fn>
  void write_planned_in_order(const int64_t* ids, size_t n, int64_t ts, const detail::BatchPlan& plan, Fn&& fn) {
    const size_t* begin = plan.shard_begin.data();
    write_held_in_order(ids, nullptr, n, ts, [begin](size_t s) { return begin[s + 1] != begin[s]; }, fn,
                        [](size_t) {});
  }

  // Writes ids [0, n) in input order (room held for them) under the write locks of the
  // shards touched(s) picks, every shard they fall in; hashes: theirs, or null to hash
  // them as they come. Allocates nothing. The batch's own rows, read in order too, are left
  // to the hardware to fetch: fetching them as the plan's order does cost 1.02x to 1.035x
  // at dim 16, 1.02x at dim 64. ahead(k) fetches those that are not in order (the sums of
  // a deduplicated write), in stage 2.
  template <class Touched, class Fn, class Ahead>
  void write_held_in_order(const int64_t* ids, const uint64_t* hashes, size_t n, int64_t ts, Touched&& touched,
                           Fn&& fn, Ahead&& ahead) {
    {
      const ExclusiveShardLocks held(*this, touched);
      note_ts(ts);
      uint64_t hash[kRing];  // item k's hash, from stage 1 to stage 4
      write_stages(
          [&](size_t k) { return ids[k]; }, [&](size_t k) { return hash[k % kRing]; },
          [&](detail::Shard& sh, size_t k, const Found& known) { fn(sh, k, ids[k], hash[k % kRing], known); },
          ahead,
          [&](auto&&... stages) {
            visit_in_order(n, write_block_, [&](size_t k) {
              const uint64_t h = hashes ? hashes[k] : hash_id(ids[k]);
              hash[k % kRing] = h;
              return shard_of(h);
            }, stages...);
          });
    }
    for (size_t s = 0; s < shards_.size(); ++s)
      if (touched(s)) shards_[s]->grow_if_due();
  }

  // The write locks of the shards touched(s) picks, taken in increasing order (as every
  // lock a batch takes) and released however the write ends. Allocates nothing.
  template <class Touched>
  class ExclusiveShardLocks {
   public:
    ExclusiveShardLocks(const EmbeddingTable& table, Touched touched) : table_(table), touched_(std::move(touched)) {
      for (; locked_ < table_.shards_.size(); ++locked_)
        if (touched_(locked_)) table_.shards_[locked_]->mu.lock();
    }
    ~ExclusiveShardLocks() {
      for (size_t s = 0; s < locked_; ++s)
        if (touched_(s)) table_.shards_[s]->mu.unlock();
    }
    ExclusiveShardLocks(const ExclusiveShardLocks&) = delete;
    ExclusiveShardLocks& operator=(const ExclusiveShardLocks&) = delete;

   private:
    const EmbeddingTable& table_;
    const Touched touched_;
    size_t locked_ = 0;  // shards [0, locked_) gone through
  };

  // Room for the ids of a write in input order (count[s] of them in shard s), held in
  // `room` (reserve_shard). The ids of the shards whose index they would grow are gathered
  // shard by shard, in one pass over the batch, for those shards to count the absent ones.
  void reserve_in_order(const int64_t* ids, const uint64_t* hashes, size_t n, const std::vector<uint64_t>& count,
                        detail::HeldRoom& room, bool gated, bool far_stamps) {
    std::vector<size_t> growing;
    for (size_t s = 0; s < shards_.size(); ++s)
      if (count[s] && !reserve_shard(s, count[s], room, gated, 0, far_stamps, nullptr)) growing.push_back(s);
    if (growing.empty()) return;
    constexpr size_t kNotGrowing = ~size_t{0};
    std::vector<size_t> cursor(shards_.size(), kNotGrowing);  // where a growing shard's next id goes
    size_t total = 0;
    for (size_t s : growing) {
      cursor[s] = total;
      total += count[s];
    }
    std::vector<int64_t> keys(total);
    std::vector<uint64_t> key_hashes(total);
    for (size_t i = 0; i < n; ++i)
      if (size_t& at = cursor[shard_of(hashes[i])]; at != kNotGrowing) {
        keys[at] = ids[i];
        key_hashes[at++] = hashes[i];
      }
    size_t first = 0;
    for (size_t s : growing) {
      reserve_shard(s, count[s], room, gated, 0, far_stamps, [&](const detail::Shard& sh, bool distinct) {
        return sh.count_absent(keys.data() + first, key_hashes.data() + first, count[s], distinct);
      });
      first += count[s];
    }
  }

  // Reserves room for every id of the batch in its shard (so allocation fails before any
  // entry changes), then calls fn(shard, position, id, hash, known) under each shard's write
  // lock (known: the id's entry, if the write found it ahead: write_blocks). inputs(position)
  // prefetches the batch's own data fn will read for that position (see detail::BatchRows).
  // `limited` = false is a checkpoint's load: it skips the capacity limit (checked by the
  // caller), and its size asks for no more shards (note_batch_size), the size of a load's
  // chunks saying nothing of the batches to come; `room_held`: the caller holds
  // lock_capacity().
  // `planned`: the batch's plan and room if the caller has them (reserve_ids). On one
  // thread, a write with no victims goes in input order (write_in_order; a planned one,
  // made for one thread: write_planned_in_order).
  template <class Ahead, class Fn>
  void for_each_shard_write(const int64_t* ids, size_t n, int64_t ts, Ahead&& inputs, Fn&& fn,
                            bool gated = true, bool limited = true, bool room_held = false,
                            const detail::PlannedWrite* planned = nullptr, bool far_stamps = false) {
    if (n == 0) {
      note_ts(ts);
      return;
    }
    const LayoutHold hold(*this);
    if (limited) note_batch_size(n);
    const CapacityRoom capacity = spec_.max_entries && limited ? capacity_room(ids, n, false, gated, room_held, planned)
                                                               : CapacityRoom{};
    if (!capacity.victims()->total) {
      if (!planned && !capacity.built_plan() && batch_threads(n) == 1)
        return write_in_order(ids, n, ts, gated, far_stamps, fn);
      if (planned && planned->chunks == 1) return write_planned_in_order(ids, n, ts, planned->plan, fn);
    }
    write_phases(ids, n, ts, planned, capacity.victims(), capacity.built_plan(), gated, far_stamps, write_chunks(n),
                 nullptr,
                 [&](const detail::BatchPlan& plan, size_t, size_t first, size_t last) {
                   const uint32_t* order = plan.order.data();
                   const int64_t* keys = plan.keys.data();
                   const uint64_t* hashes = plan.hashes.data();
                   write_blocks(plan, plan.shard_begin.data(), first, last, [](size_t k) { return k; },
                                [&](detail::Shard& sh, size_t k, const Found& known) {
                                  fn(sh, order[k], keys[k], hashes[k], known);
                                },
                                [&](size_t k) { inputs(order[k]); });
                 });
  }

  // The work of a write batch as phases on the pool, all in one wake-up of the helpers:
  // build the plan over consecutive ranges of the batch, reserve and hold room in every
  // shard the batch touches, prepare(plan, chunk, first, last) (nullptr: nothing to prepare),
  // evict the `victims` (if any) shard by shard, then write(plan, chunk, first, last) for
  // `chunks` runs of consecutive shards [first, last) (write_chunks(n): more than one per
  // thread, to share the work out). Everything that can fail (allocations, the room, what
  // `prepare` does) is done before any entry changes. A planned write (reserve_ids) has its
  // plan, room, chunks and preparation already, and allocates nothing here. `built_plan`:
  // the batch's plan, if counting its ids for a capacity limit built it (room_for). `far_stamps`:
  // the write may stamp its entries with timestamps that a slot keeps apart (Shard::stamp).
  template <class Prepare, class Write>
  void write_phases(const int64_t* ids, size_t n, int64_t ts, const detail::PlannedWrite* planned,
                    const detail::Victims* victims, const detail::BatchPlan* built_plan, bool gated, bool far_stamps,
                    size_t chunks, Prepare&& prepare, Write&& write) {
    constexpr bool preparing = !std::is_same_v<std::decay_t<Prepare>, std::nullptr_t>;
    std::optional<detail::BatchPlan> own;
    if (!planned && !built_plan) own.emplace(ids, n, shard_bits_, batch_ranges(n));
    const detail::BatchPlan& plan = planned ? planned->plan : built_plan ? *built_plan : *own;
    if (!plan.ordered()) throw std::logic_error("a write by shards was given a plan of counts alone");
    const size_t ranges = own ? own->num_ranges() : 0;
    const size_t shards = planned ? 0 : shards_.size();
    if (planned) chunks = planned->chunks;
    detail::HeldRoom room(shards);
    const size_t evicted_shards = victims && victims->total ? shards_.size() : 0;
    ThreadPool::global().parallel_phases(
        {ranges, ranges, planned ? 0 : chunks, preparing && !planned ? chunks : 0, evicted_shards, chunks},
        [&](size_t phase, size_t i) {
          if (phase == 0) {
            own->count_range(i);
          } else if (phase == 1) {
            own->place_range(i);
          } else if (phase == 2) {
            const auto [first, last] = chunk_shards(i, chunks);
            for (size_t s = first; s < last; ++s)
              reserve_shard(plan, s, room, gated, evicted_shards ? victims->by_shard[s].size() : 0, far_stamps);
          } else if (phase == 4) {
            evict_shard(*victims, i);
          } else {
            const auto [first, last] = chunk_shards(i, chunks);
            if (plan.shard_begin[last] == plan.shard_begin[first]) return;
            if (phase == 3) {
              if constexpr (preparing) prepare(plan, i, first, last);
              return;
            }
            note_ts(ts);
            write(plan, i, first, last);
            for (size_t s = first; s < last; ++s)
              if (plan.shard_begin[s + 1] != plan.shard_begin[s]) shards_[s]->grow_if_due();
          }
        },
        threads_for(n));
  }

  // A write of n ids: a batch with many ids per shard asks for more shards (can_split).
  void note_batch_size(size_t n) {
    if (can_split() && n > (kSplitIdsPerShard << shard_bits_)) {
      uint64_t most = split_batch_.load(std::memory_order_relaxed);
      while (n > most && !split_batch_.compare_exchange_weak(most, n, std::memory_order_relaxed)) {
      }
      split_wanted_.store(true, std::memory_order_relaxed);
    }
  }

  // How many runs of consecutive shards a write's shards are handled in: one on one thread;
  // on several, four per thread, so that a thread that starts late still gets its share.
  size_t write_chunks(size_t n) const {
    const size_t threads = batch_threads(n);
    return threads == 1 ? 1 : std::min(shards_.size(), 4 * threads);
  }

  // The shards [first, last) of chunk i of `chunks`.
  std::pair<size_t, size_t> chunk_shards(size_t i, size_t chunks) const {
    return {shards_.size() * i / chunks, shards_.size() * (i + 1) / chunks};
  }

  // How many consecutive ranges a write builds its plan over: one per thread, none too small.
  static size_t batch_ranges(size_t n) {
    return std::max<size_t>(1, std::min(batch_threads(n), n / detail::kMinIdsPerTask));
  }

  // As for_each_shard_write, but calls fn(shard, row, count, id, hash, known) once per
  // distinct id (and block) occurring `count` times, with the sum, left to right, of the
  // `width`-float rows row(position) of its occurrences.
  template <class Row, class Fn>
  void for_each_shard_write_runs(const int64_t* ids, size_t n, int64_t ts, const uint32_t* blocks, Row&& row,
                                 size_t width, Fn&& fn, bool room_held = false,
                                 const detail::PlannedWrite* planned = nullptr) {
    if (n == 0) {
      note_ts(ts);
      return;
    }
    const LayoutHold hold(*this);
    note_batch_size(n);
    // Blocks admit as they come (detail::AdmissionCount): room for the admissions of each
    // block as its write will make them. (The plan of that count is not the write's.)
    const bool by_blocks = blocks && counts_admissions() && !(planned && planned->victims);
    const std::vector<int64_t> counted = by_blocks ? detail::AdmissionCount::of(ids, n, blocks, true)
                                                   : std::vector<int64_t>();
    CapacityRoom capacity = !spec_.max_entries ? CapacityRoom{}
                            : by_blocks ? capacity_room(counted.data(), counted.size(), false, true, room_held, planned)
                                        : capacity_room(ids, n, true, true, room_held, planned);
    if (by_blocks) capacity.plan.reset();
    // A small batch (on one thread), with nothing to evict: the runs in input order
    // (write_in_order), grouped over the batch (Runs::group_in_order); a planned one was
    // grouped so by group_runs, its room held by its plan of counts.
    const size_t bytes = sizeof(float) * width;
    auto run_in_order = [&fn, &row, width](const detail::Runs& runs) {
      return [&fn, &row, width, &runs](detail::Shard& sh, size_t r, int64_t id, uint64_t h, const Found& known) {
        fn(sh, runs.row_in_order(r, width, row), runs.count[r], id, h, known);
      };
    };
    auto ahead_in_order = [&row, width, bytes](const detail::Runs& runs) {
      return [&row, width, bytes, &runs](size_t r) {
        // A sum, and a row that occurs once when it spans several lines: the rows are in
        // order but with gaps, which the hardware does not follow.
        if (runs.sum_of[r] != detail::Runs::kEnd || bytes > 64)
          detail::prefetch_lines(runs.row_in_order(r, width, row), bytes);
      };
    };
    if (planned && !planned->plan.ordered()) {
      if (planned->runs.size() != 1) throw std::logic_error("a planned write was not grouped");
      const detail::Runs& runs = planned->runs[0];
      const size_t* begin = planned->plan.shard_begin.data();
      write_held_in_order(runs.ids.data(), runs.hashes.data(), runs.ids.size(), ts,
                          [begin](size_t s) { return begin[s + 1] != begin[s]; }, run_in_order(runs),
                          ahead_in_order(runs));
      return;
    }
    if (!planned && !blocks && !capacity.victims()->total && !capacity.built_plan() && threads_for(n) == 1) {
      detail::Runs& runs = detail::Runs::per_chunk(1)[0];
      runs.group_in_order(ids, n, width, row);
      write_in_order(runs.ids.data(), runs.hashes.data(), runs.ids.size(), ts, true, far_stamp(ts), run_in_order(runs),
                     ahead_in_order(runs));
      runs.trim();
      return;
    }
    // The runs of equal ids are visited as the ids of a plain write are, each prefetched at
    // its first occurrence (most ids occur once).
    const size_t chunks = write_chunks(n);
    // A planned write's runs are grouped by its caller (group_runs).
    if (planned && planned->runs.size() != planned->chunks) throw std::logic_error("a planned write was not grouped");
    std::vector<detail::Runs>* own_runs = planned ? nullptr : &detail::Runs::per_chunk(chunks);
    const std::vector<detail::Runs>& chunk_runs = planned ? planned->runs : *own_runs;
    write_phases(
        ids, n, ts, planned, capacity.victims(), capacity.built_plan(), true, far_stamp(ts), chunks,
        [&](const detail::BatchPlan& plan, size_t chunk, size_t first, size_t last) {
          (*own_runs)[chunk].group(plan, first, last, blocks, width, row);
        },
        [&](const detail::BatchPlan& plan, size_t chunk, size_t first, size_t last) {
          const detail::Runs& runs = chunk_runs[chunk];
          const size_t bytes = sizeof(float) * width;
          const uint32_t* head = runs.first.data();
          auto run = [&](detail::Shard& sh, size_t r, const Found& known) {
            fn(sh, runs.summed_row(plan, r, width, row), runs.count[r], plan.keys[head[r]], plan.hashes[head[r]],
               known);
          };
          // A run's own row: its sum, or the row of its one occurrence.
          auto ahead = [&](size_t r) { detail::prefetch_lines(runs.summed_row(plan, r, width, row), bytes); };
          write_blocks(plan, runs.begin.data(), first, last, [head](size_t r) { return head[r]; }, run, ahead);
        });
    if (own_runs)
      for (detail::Runs& runs : *own_runs) runs.trim();
  }

  // With a capacity limit: the ids of a write batch and their occurrences, and how many new
  // entries the write will create (simulating the admission filter without changing it),
  // into `room`. Throws, changing nothing, when the batch cannot fit however many entries
  // are evicted. The caller holds capacity_mu_.
  struct ShardRoom {
    struct Distinct {
      int64_t id;
      uint64_t h;
      const uint64_t* occurrences;
    };
    detail::CountMap occurrences;  // id -> occurrences in the batch, for the shard's ids
    std::vector<Distinct> distinct;  // the shard's ids, each as it first occurs
    uint64_t new_entries = 0, present = 0;
    std::vector<int64_t> admitted;
  };
  // A room is kept from one write to the next (room_kept_), so that its memory is not taken
  // from the system and faulted in again at every write: the C library gave the maps of a
  // 65,536-id batch (4 MB) back once they were freed, and a write to a full table of 1M
  // entries whose ids were all stored then spent a fifth of its time in page faults.
  struct Room {
    std::vector<ShardRoom> by_shard;
    uint64_t new_entries = 0;
    uint64_t present = 0;            // distinct ids of the batch already in the table
    std::vector<int64_t> admitted;   // the new ones it inserts
  };
  // The most ids a batch can have for its room to be kept (about 70 bytes an id).
  static constexpr size_t kKeptRoomIds = size_t{1} << 17;
  // Whether the batch of `room` writes `id` (h = hash_id(id)).
  bool writes(const Room& room, int64_t id, uint64_t h) const {
    return room.by_shard[shard_of(h)].occurrences.find(id, h) != nullptr;
  }
  // `plan_out`: where the batch's plan goes, for the write to use rather than build its own
  // (null: it is dropped).
  void room_for(const int64_t* ids, size_t n, bool runs, bool gated, Room& room,
                std::optional<detail::BatchPlan>* plan_out = nullptr) const {
    const LayoutHold hold(*this);
    // Shard by shard, over the threads: a shard's ids are counted in a map of their own,
    // which stays in the core's cache (one map of a 65,536-id batch did not), and looked for
    // with the shard locked once, a block at a time while the next block's home buckets are
    // fetched (as count_absent). The plan is built over the threads too, as a write's is. A
    // table of one shard needs no plan, and a small batch no pool: writes of one id to 100
    // small tables paid 15% more for them.
    const size_t threads = batch_threads(n);
    std::optional<detail::BatchPlan> own_plan;
    std::optional<detail::BatchPlan>& plan = plan_out ? *plan_out : own_plan;
    plan.reset();
    if (shards_.size() > 1) {
      if (threads == 1) plan.emplace(ids, n, shard_bits_);  // built here
      else plan.emplace(ids, n, shard_bits_, batch_ranges(n));  // built by the pool, below
    }
    room.by_shard.resize(shards_.size());
    room.new_entries = room.present = 0;
    room.admitted.clear();
    auto count_shard = [&](size_t s) {
      const size_t first = plan ? plan->shard_begin[s] : 0, last = plan ? plan->shard_begin[s + 1] : n;
      ShardRoom& part = room.by_shard[s];
      part.new_entries = part.present = 0;
      part.admitted.clear();
      part.distinct.clear();
      if (first == last) {
        part.occurrences.clear();
        return;
      }
      part.occurrences.clear_for(last - first);  // so the counts stay where they are
      // Each id as it first occurs, with its hash and count (rather than a pass over the map
      // afterwards, which read its empty slots too and hashed every id again).
      std::vector<ShardRoom::Distinct>& distinct = part.distinct;
      distinct.reserve(last - first);
      for (size_t k = first; k < last; ++k) {
        const int64_t id = plan ? plan->keys[k] : ids[k];
        const uint64_t h = plan ? plan->hashes[k] : hash_id(id);
        const auto [count, first_seen] = part.occurrences.try_emplace(id, h);
        ++*count;
        if (first_seen) distinct.push_back(ShardRoom::Distinct{id, h, count});
      }
      const detail::Shard& sh = *shards_[s];
      auto classify = [&](const ShardRoom::Distinct& d) {
        if (sh.find(d.id, d.h).bucket) {
          ++part.present;
          return;
        }
        if (gated && has_filter_) {
          const uint32_t threshold = thresholds_.of(d.id);
          const uint64_t* count = sh.counts.find(d.id, d.h);
          const uint64_t before = count ? *count : 0;
          const uint64_t last_seen = runs ? before : before + *d.occurrences - 1;
          if (threshold > 0 && last_seen < threshold) return;  // stays filtered
        }
        ++part.new_entries;
        part.admitted.push_back(d.id);
      };
      constexpr size_t K = 16;
      const size_t m = distinct.size();
      std::shared_lock<detail::SharedMutex> lk(sh.mu);
      for (size_t k = 0; k < std::min(m, K); ++k) sh.prefetch_group(distinct[k].h);
      for (size_t b = 0; b < m; b += K) {
        for (size_t k = b + K, e = std::min(m, b + 2 * K); k < e; ++k) sh.prefetch_group(distinct[k].h);
        for (size_t k = b, e = std::min(m, b + K); k < e; ++k) classify(distinct[k]);
      }
    };
    if (threads == 1) {
      for (size_t s = 0; s < shards_.size(); ++s) count_shard(s);
    } else {
      const size_t ranges = plan ? plan->num_ranges() : 0;
      ThreadPool::global().parallel_phases(
          {ranges, ranges, shards_.size()},
          [&](size_t phase, size_t i) {
            if (phase == 0) plan->count_range(i);
            else if (phase == 1) plan->place_range(i);
            else count_shard(i);
          },
          static_cast<int>(threads));
    }
    for (ShardRoom& part : room.by_shard) {
      room.present += part.present;
      room.new_entries += part.new_entries;
      if (room.admitted.empty()) room.admitted.swap(part.admitted);  // the one shard's: no copy
      else room.admitted.insert(room.admitted.end(), part.admitted.begin(), part.admitted.end());
    }
    const uint64_t present = room.present;
    if (room.new_entries > spec_.max_entries)
      throw ValueError("this write brings " + std::to_string(room.new_entries) +
                       " new ids but the table holds at most " + std::to_string(spec_.max_entries) +
                       " entries (max_entries)");
    if (present + room.new_entries > spec_.max_entries)
      throw ValueError("this write touches " + std::to_string(present + room.new_entries) +
                       " distinct ids but the table holds at most " + std::to_string(spec_.max_entries) +
                       " entries (max_entries)");
  }

  // The capacity side of a write to a capacity-limited table: the lock, and the entries
  // it evicts (chosen by the caller of a planned write, or here).
  struct CapacityRoom {
    std::unique_lock<std::mutex> lock;
    detail::Victims chosen;
    const detail::Victims* planned = nullptr;
    std::optional<detail::BatchPlan> plan;  // built while counting the batch's ids (room_for)
    const detail::Victims* victims() const { return planned ? planned : &chosen; }
    const detail::BatchPlan* built_plan() const { return plan ? &*plan : nullptr; }
  };
  CapacityRoom capacity_room(const int64_t* ids, size_t n, bool runs, bool gated, bool room_held,
                             const detail::PlannedWrite* planned) {
    CapacityRoom c;
    if (planned && planned->victims) c.planned = &*planned->victims;
    else c.lock = choose_victims(ids, n, runs, gated, room_held, c.chosen, &c.plan);
    return c;
  }

  // An entry as a candidate for eviction, ordered by the policy's keys, then by id.
  struct Candidate {
    uint64_t k1, k2;
    int64_t id;
    bool operator<(const Candidate& o) const {
      if (k1 != o.k1) return k1 < o.k1;
      if (k2 != o.k2) return k2 < o.k2;
      return id < o.id;
    }
  };
  // Orders candidates as operator< does. (The clocks and counts of the entries up to a
  // bound lie in a narrow range, whose bytes that never differ the radix sort skips. A
  // scan of 1M entries that keeps 125,000, random ids, C++ loop: 22.4 ms with a
  // comparison sort, 16.5 with this.)
  static void sort_by_key(std::vector<Candidate>& v) {
    detail::radix_sort<3>(v, [](const Candidate& c, size_t w) {
      return w == 0 ? c.k1 : w == 1 ? c.k2 : static_cast<uint64_t>(c.id) ^ (uint64_t{1} << 63);
    });
  }
  Candidate candidate(int64_t id, const uint64_t* meta) const {
    return spec_.eviction_policy == 0 ? Candidate{meta[0], 0, id} : Candidate{meta[1], meta[0], id};
  }

  // With a capacity limit: if the write batch would grow the table past max_entries,
  // chooses the entries it evicts (`victims`), among those the batch does not touch, by the
  // eviction policy; evict_shard removes them once everything that can fail is done. Throws,
  // changing nothing, when the batch cannot fit. Returns the lock that keeps
  // capacity-limited writes one at a time until the batch is written (an empty one when the
  // caller already holds it: `room_held`). The victims are the first `excess` entries by
  // (policy key, id) among those the batch does not touch: from the entries an earlier scan
  // kept (VictimPool), or from a scan (choose_by_scan).
  // `plan`: where the batch's plan goes if the ids are counted (room_for).
  std::unique_lock<std::mutex> choose_victims(const int64_t* ids, size_t n, bool runs, bool gated, bool room_held,
                                              detail::Victims& victims,
                                              std::optional<detail::BatchPlan>* plan = nullptr) {
    const LayoutHold hold(*this);
    std::unique_lock<std::mutex> lock;
    if (!room_held) lock = std::unique_lock<std::mutex>(capacity_mu_);
    write_clock_.fetch_add(1);
    victims.by_shard.assign(shards_.size(), {});
    victims.total = 0;
    // The size first: an entry that evict() (expiry) removes once the size is read was
    // counted in it, so if the batch counted it present and so inserts it again, the room
    // its removal left pays for that. Counted the other way round, an entry removed in
    // between was in neither count, and the write took the table past its limit by one for
    // each such entry that the batch writes.
    const uint64_t current = size();
    // With room for n more entries, nothing is evicted, and the ids need not be counted
    // unless the kept records want this write's new LFU entries (below). A table kept under
    // its limit (by expiry, or still filling) then writes nearly as fast as one without: 1M
    // entries with room for 2M, 65,536-id Adagrad steps, a tenth of each new, C++ loop, one
    // thread: 5.5 -> 2.8 ms a write, against 2.4 without a limit.
    if (current + n <= spec_.max_entries && !pool_takes_new_entries()) return lock;
    Room big_batch;  // a big batch's room is not kept
    Room& room = n > kKeptRoomIds ? big_batch : room_kept_;
    room_for(ids, n, runs, gated, room, plan);
    try {
      if (current + room.new_entries > spec_.max_entries) {
        const uint64_t excess = current + room.new_entries - spec_.max_entries;
        if (!victims_from_pool(room, excess, victims)) choose_by_scan(room, excess, current, victims);
      }
      // With LFU a new entry may count fewer writes than the pool's last entry: it joins the
      // pool (with the least key, so it is looked at first). With LRU its clock is later.
      if (pool_takes_new_entries())
        for (const int64_t id : room.admitted) pool_.pending.push_back(Candidate{0, 0, id});
    } catch (...) {
      // Out of memory part way: records taken from the kept ones may be neither back nor
      // among the victims, and without them a later write could pass over the entry that
      // comes first. The next write scans the table again.
      pool_.valid = false;
      throw;
    }
    return lock;
  }

  // Chooses the victims from a scan of the table. At most `present` touched entries come
  // before them, so they are among the first excess + present of all entries, whose keys
  // are at most a bound read off a sample of the entries (all of them when the sample cannot
  // tell). Only the entries up to the bound are gathered and ordered, and only they are
  // looked up among the batch's ids (1M entries, steps of 65,536 ids of which a tenth new:
  // 48x slower than without a limit when every entry was gathered, ordered and looked up).
  // The first of them are kept in order for the next writes (VictimPool): an eighth of the
  // table (3 bytes an entry), or what this write needs if that is more. A scan costs time in
  // proportion to the table, so it must serve evictions in proportion to the table too: when
  // it kept eight times what the write needed, a table of 1M entries at its limit, written
  // 256 new ids at a time, scanned every 24 writes, at 20 times the time per id of a table
  // without a limit (46 times at 4M).
  void choose_by_scan(const Room& room, uint64_t excess, uint64_t current, detail::Victims& victims) {
    const uint64_t wanted = std::min(current, excess + room.present);
    const uint64_t kept = std::min(current, std::max(wanted, std::max<uint64_t>(current / 8, 4096)));
    std::vector<Candidate> gathered = candidates_up_to(key_bound(kept, current));
    if (gathered.size() < kept) gathered = candidates_up_to(Candidate{UINT64_MAX, UINT64_MAX, INT64_MAX});
    if (gathered.size() > 2 * kept)  // all of them were gathered, or many share the bound's keys
      std::nth_element(gathered.begin(), gathered.begin() + static_cast<ptrdiff_t>(kept - 1), gathered.end());
    gathered.resize(std::min<size_t>(gathered.size(), 2 * kept));
    sort_by_key(gathered);
    gathered.resize(kept);
    pool_ = VictimPool{};
    pool_.bound = gathered.back();
    pool_.scanned.records = std::move(gathered);
    pool_.resets = resets_.load(std::memory_order_relaxed);
    pool_.valid = true;
    // Every record is its entry's (they were just gathered).
    for (Run& run = pool_.scanned; victims.total < excess && !run.done();) {
      const Candidate& c = run.records[run.next++];
      take(c, hash_id(c.id), room, victims);
    }
    pool_.evicted_after = evictions_.load(std::memory_order_relaxed) + victims.total;
  }

  // A record of the pool whose key is its entry's, in its turn: the entry is a victim,
  // unless the batch writes it.
  void take(const Candidate& c, uint64_t h, const Room& room, detail::Victims& victims) {
    if (writes(room, c.id, h)) {
      pool_.pending.push_back(c);
      return;
    }
    victims.by_shard[shard_of(h)].push_back(c.id);
    ++victims.total;
    pool_.chosen.push_back(c);
  }

  // Records in order, taken from the front.
  struct Run {
    std::vector<Candidate> records;
    size_t next = 0;  // records before it are elsewhere or dropped
    bool done() const { return next == records.size(); }
  };

  // The entries a scan kept (choose_by_scan), for the next writes to take their victims
  // from. Invariant: every entry whose key is at most `bound` has a record, in a run (from
  // its `next` on), in `heap` or in `pending`, with its id and a key at most its own. A write
  // only raises the keys of the entries it touches (a later clock, one more write). A new
  // entry (one removed before included) gets a record of the least key when its write
  // chooses its victims, with LFU (it may count fewer writes than `bound`; with LRU its
  // clock is later than any). Only load_entries (a clock and a count of 0) and reinitialize
  // (a count of 1) lower keys; they drop the pool (drop_kept_victims), and so does evict.
  // So the smallest record whose key is still its entry's is the entry that comes first,
  // and the victims are the first `excess` of those that the batch does not touch. A record
  // of a higher key than its entry's is dropped (the entry was inserted again: that has a
  // record); one of a lower key is dropped, or put back with the entry's key if that is
  // still at most `bound`; one of its entry's key stays (the entry is evicted by this
  // write, or written by it, or neither if the write fails: the next write tells), and
  // equal records of one entry are kept once. The victims' records are dropped once their
  // write has evicted them all. 1M entries, steps of 65,536 ids of which a
  // tenth new: a scan every 8 writes or so instead of every write (LFU: 2.8 -> 7.6 M ids/s
  // on two threads, LRU: 3.1 -> 10).
  struct VictimPool {
    Run scanned;                     // from the scan
    Run settled;                     // from earlier writes (settle_pending)
    std::vector<Candidate> heap;     // put back during this write: a min-heap (push_pool)
    std::vector<Candidate> pending;  // records the last write looked at or made, unchecked
    std::vector<Candidate> chosen;   // the last write's victims' records
    uint64_t evicted_after = 0;      // evictions_ once the last write has evicted its victims
    Candidate bound{};
    uint64_t resets = 0;  // resets_ when gathered
    bool valid = false;
  };
  static bool after(const Candidate& a, const Candidate& b) { return b < a; }
  // Makes the next capacity-limited write scan again (see VictimPool). Any thread.
  void drop_kept_victims() { resets_.fetch_add(1, std::memory_order_relaxed); }
  void push_pool(const Candidate& c) {
    pool_.heap.push_back(c);
    std::push_heap(pool_.heap.begin(), pool_.heap.end(), after);
  }

  // The shard of hash h. The pool's records are looked at with every shard's shared lock
  // held, taken once (victims_from_pool): a lock taken for each look and each fetch ahead,
  // three a record, cost 2% to 3% of a write (1M entries at their limit, LRU, steps of 65,536
  // ids, C++ loop, one thread and two).
  const detail::Shard& shard_for(uint64_t h) const { return *shards_[shard_of(h)]; }

  // What a record of the pool says of its entry now: its key then (`now`), or that it is
  // gone. Reads the entry's bucket and its row's bookkeeping.
  bool entry_key(const Candidate& c, uint64_t h, Candidate* now) const {
    const detail::Shard& sh = shard_for(h);
    const Slot slot = sh.find(c.id, h);
    if (slot.bucket) *now = candidate(c.id, sh.entry(slot.row()).meta);
    return slot.bucket != nullptr;
  }
  // For records looked at in order, called before records[i] is: a record's home bucket is
  // fetched 16 records ahead of its turn, and its row's bookkeeping 8 ahead (the bucket is
  // in by then), so that looking at one does not wait on memory twice. With the `room` of a
  // write, so is the slot of its id in the batch's counts (take), which missed the cache:
  // the counts of a batch of 65,536 ids take 2 to 4 MB.
  // (Also for the ids a write evicts, evict_shard: `id_of(k)` is the id of the k-th of n.)
  template <class IdOf>
  void fetch_ahead(size_t n, size_t i, IdOf&& id_of, const Room* room) const {
    auto bucket = [this, room](int64_t id) {
      const uint64_t h = hash_id(id);
      shard_for(h).prefetch_group(h);
      if (room) room->by_shard[shard_of(h)].occurrences.prefetch(h);
    };
    if (i == 0)
      for (size_t k = 0; k < std::min<size_t>(n, 16); ++k) bucket(id_of(k));
    if (i + 16 < n) bucket(id_of(i + 16));
    if (i + 8 < n) {
      const int64_t id = id_of(i + 8);
      const uint64_t h = hash_id(id);
      shard_for(h).prefetch_meta(id, h);
    }
  }
  void fetch_ahead(const std::vector<Candidate>& records, size_t i, const Room* room) const {
    fetch_ahead(records.size(), i, [&records](size_t k) { return records[k].id; }, room);
  }

  // The records the last write looked at or made go into the settled run if they still
  // hold, or with their entry's key if that was raised and is still at most the bound, and
  // so do the records the last write put back. (Checked one at a time as they came out of
  // a heap, each waited on memory twice: a write's victims' records, and with LFU its new
  // entries', are as many as its new ids. And taking records from a run of them in order is
  // cheaper than from a heap: LFU, 1M entries, steps of 65,536 ids of which a tenth new,
  // C++ loop: 3.7-3.9 ms a write in the kept records before, 2.4-2.5 now.)
  void settle_pending() {
    std::vector<Candidate> pending = std::move(pool_.pending);
    pool_.pending.clear();
    // Victims stand if their write failed (each write that evicts holds capacity_mu_).
    if (evictions_.load(std::memory_order_relaxed) != pool_.evicted_after)
      pending.insert(pending.end(), pool_.chosen.begin(), pool_.chosen.end());
    pool_.chosen.clear();
    std::vector<Candidate> fresh = std::move(pool_.heap);
    pool_.heap.clear();
    for (size_t i = 0; i < pending.size(); ++i) {
      fetch_ahead(pending, i, nullptr);
      const Candidate& c = pending[i];
      Candidate now;
      if (!entry_key(c, hash_id(c.id), &now) || now < c) continue;  // gone, or inserted again
      if (!(pool_.bound < now)) fresh.push_back(now);
    }
    if (fresh.empty()) return;
    sort_by_key(fresh);
    Run& run = pool_.settled;
    std::vector<Candidate> merged;
    merged.reserve(run.records.size() - run.next + fresh.size());
    std::merge(run.records.begin() + static_cast<ptrdiff_t>(run.next), run.records.end(), fresh.begin(), fresh.end(),
               std::back_inserter(merged));
    run.records = std::move(merged);
    run.next = 0;
  }

  // Takes the pool's least record into *c: the least of the runs' heads and the heap's top.
  bool take_least(const Room& room, Candidate* c) {
    Run* least = nullptr;
    for (Run* run : {&pool_.scanned, &pool_.settled})
      if (!run->done() && (!least || run->records[run->next] < least->records[least->next])) least = run;
    if (!pool_.heap.empty() && (!least || pool_.heap.front() < least->records[least->next])) {
      std::pop_heap(pool_.heap.begin(), pool_.heap.end(), after);
      *c = pool_.heap.back();
      pool_.heap.pop_back();
      return true;
    }
    if (!least) return false;
    fetch_ahead(least->records, least->next, &room);
    *c = least->records[least->next++];
    return true;
  }

  // Whether the kept records still stand for the table (nothing dropped them since).
  bool pool_usable() const { return pool_.valid && pool_.resets == resets_.load(std::memory_order_relaxed); }
  // Whether a write's new entries need records in the kept ones (LFU: see VictimPool).
  bool pool_takes_new_entries() const { return spec_.eviction_policy != 0 && pool_usable(); }

  bool victims_from_pool(const Room& room, uint64_t excess, detail::Victims& victims) {
    if (!pool_usable()) return false;
    const SharedShardLocks locks(*this, nullptr, 0, SIZE_MAX);  // every shard (see shard_for)
    settle_pending();
    Candidate last{};  // the last record found its entry's
    bool any = false;
    Candidate c;
    while (victims.total < excess && take_least(room, &c)) {
      const uint64_t h = hash_id(c.id);
      Candidate now;
      if (!entry_key(c, h, &now)) continue;  // gone
      if (c < now) {  // written since
        if (!(pool_.bound < now)) push_pool(now);
        continue;
      }
      if (now < c) continue;  // removed and inserted again since: its insertion has a record
      // An entry can have several records (an old one from the scan, one from its
      // insertion, each put back with its new key); those with its key are equal, and come
      // out one after the other.
      if (any && !(last < c)) continue;
      last = c;
      any = true;
      take(c, h, room, victims);
    }
    pool_.evicted_after = evictions_.load(std::memory_order_relaxed) + victims.total;
    if (victims.total == excess) return true;
    for (auto& ids : victims.by_shard) ids.clear();
    victims.total = 0;
    pool_.valid = false;
    return false;
  }

  // fn(s, out) for every shard s, the shards spread over the threads (each under its shared
  // lock, adding to `out`), and what they added, shard after shard.
  template <class Fn>
  std::vector<Candidate> gather_by_shard(Fn&& fn) const {
    std::vector<std::vector<Candidate>> per_shard(shards_.size());
    ThreadPool::global().parallel_for(shards_.size(), [&](size_t s) {
      std::shared_lock<detail::SharedMutex> lk(shards_[s]->mu);
      fn(*shards_[s], per_shard[s]);
    });
    size_t total = 0;
    for (const auto& v : per_shard) total += v.size();
    std::vector<Candidate> out;
    out.reserve(total);
    for (const auto& v : per_shard) out.insert(out.end(), v.begin(), v.end());
    return out;
  }

  // fn(row, meta) for the bookkeeping of every `step`-th row of a shard that holds an entry
  // (in row order: a sequential read; free rows are few, so the test for them predicts).
  template <class Fn>
  static void for_each_row_meta(const detail::Shard& sh, uint64_t step, Fn&& fn) {
    sh.rows().for_each_in_column(1, step, [&](uint32_t r, const char* at) {
      const auto* meta = reinterpret_cast<const uint64_t*>(at);
      if (meta[0] != detail::Shard::kFreeRow) fn(r, meta);
    });
  }

  // A candidate that at least `wanted` of the table's `current` entries are not after, read
  // off the keys of about 65,536 entries (every so many rows) with a margin; the last one
  // possible when the sample is too small to tell.
  Candidate key_bound(uint64_t wanted, uint64_t current) const {
    constexpr Candidate kLast{UINT64_MAX, UINT64_MAX, INT64_MAX};
    const uint64_t step = std::max<uint64_t>(1, current / 65536);
    std::vector<Candidate> sample = gather_by_shard([&](const detail::Shard& sh, std::vector<Candidate>& out) {
      for_each_row_meta(sh, step, [&](uint32_t, const uint64_t* meta) { out.push_back(candidate(0, meta)); });
    });
    // The sample's share of `wanted`, a fifth more and a margin of about eight standard
    // deviations for a binomial draw: fewer than `wanted` entries up to the bound would cost
    // a second pass over all of them, not a wrong choice.
    const double expected = static_cast<double>(sample.size()) * static_cast<double>(wanted) / static_cast<double>(current);
    const auto rank = static_cast<uint64_t>(1.2 * expected + 8.0 * std::sqrt(expected) + 64.0);
    if (rank >= sample.size()) return kLast;
    std::nth_element(sample.begin(), sample.begin() + static_cast<ptrdiff_t>(rank), sample.end());
    return Candidate{sample[rank].k1, sample[rank].k2, INT64_MAX};
  }

  // Every entry whose keys are at most `bound`'s (whose id is the largest). The rows'
  // bookkeeping, in row order, is read front to back first, marking the rows up to the
  // bound; then the index, front to back, gives the ids of the marked rows, whose
  // bookkeeping is fetched a run of buckets' worth at a time. Neither pass branches on
  // what it reads (whether a slot is taken, whether a key is low: random, so such branches
  // mispredict). 1M entries, one thread: 13.4-14.2 ms a scan before, 11.0 now.
  std::vector<Candidate> candidates_up_to(const Candidate& bound) const {
    auto up_to_bound = [&bound](const Candidate& c) -> bool {
      return (c.k1 < bound.k1) | ((c.k1 == bound.k1) & (c.k2 <= bound.k2));
    };
    return gather_by_shard([&](const detail::Shard& sh, std::vector<Candidate>& out) {
      const detail::RowArena& rows = sh.rows();
      std::vector<uint64_t> marked((rows.rows_used() + 63) / 64, 0);
      for_each_row_meta(sh, 1, [&](uint32_t r, const uint64_t* meta) {
        marked[r / 64] |= uint64_t{up_to_bound(candidate(0, meta))} << (r % 64);
      });
      size_t count = 0;  // room for them all at once, rather than growing the vector
      for (const uint64_t word : marked) count += static_cast<size_t>(__builtin_popcountll(word));
      out.reserve(out.size() + count);
      sh.for_each_run([&](const detail::Shard::Copied* entries, size_t n) {
        // The marked entries' ids and rows first, then only their bookkeeping's addresses.
        std::pair<int64_t, uint32_t> found[detail::Shard::kRunBuckets * detail::kBucketSlots];
        const uint64_t* meta[detail::Shard::kRunBuckets * detail::kBucketSlots];
        size_t m = 0;
        for (size_t i = 0; i < n; ++i) {
          const uint32_t r = entries[i].row - 1;
          found[m] = {entries[i].key, r};
          m += marked[r / 64] >> (r % 64) & 1;
        }
        for (size_t k = 0; k < m; ++k) {
          meta[k] = reinterpret_cast<const uint64_t*>(rows.at(1, found[k].second));
          detail::prefetch(meta[k]);
        }
        for (size_t k = 0; k < m; ++k) out.push_back(candidate(found[k].first, meta[k]));
      });
    });
  }

  // Removes the victims in shard s. Allocates nothing. Each victim's bucket and the
  // bookkeeping the removal writes are fetched ahead (fetch_ahead), and the evictions are
  // counted once: removals one after another, each waiting on memory and adding to the
  // shared count, cost 2% to 3% of a write (as in shard_for).
  void evict_shard(const detail::Victims& victims, size_t s) {
    const std::vector<int64_t>& ids = victims.by_shard[s];
    if (ids.empty()) return;
    detail::Shard& sh = *shards_[s];
    std::unique_lock<detail::SharedMutex> lk(sh.mu);
    uint64_t evicted = 0;
    for (size_t k = 0; k < ids.size(); ++k) {
      fetch_ahead(ids.size(), k, [&ids](size_t q) { return ids[q]; }, nullptr);
      evicted += sh.erase(ids[k], hash_id(ids[k]));
    }
    evictions_ += evicted;
  }

  // Room in shard s for the plan's new ids of that shard, held for the write in `room` (no
  // ids there: nothing to do), before any entry changes. The shard's share of the batch
  // bounds its new ids; only when that bound would grow the index now (past its slack:
  // Shard::reserve) are the ids looked up, so rewriting ids already present never grows an
  // index. `leaving`: entries of the shard the write evicts before it inserts, whose room
  // its new entries take. With an admission filter (`gated` writes), the filter's counts get
  // room for the ids too, beside the room held by other writes (each of whose held entries
  // may turn out a count instead).
  // `far_stamps`: the write stamps timestamps that a slot keeps apart, so every id of the
  // shard's share gets room for one (Shard::hold).
  void reserve_shard(const detail::BatchPlan& plan, size_t s, detail::HeldRoom& room, bool gated,
                     uint64_t leaving = 0, bool far_stamps = false) {
    const size_t b = plan.shard_begin[s], e = plan.shard_begin[s + 1];
    if (b == e) return;
    reserve_shard(s, e - b, room, gated, leaving, far_stamps, [&](const detail::Shard& sh, bool distinct) {
      return sh.count_absent(plan.keys.data() + b, plan.hashes.data() + b, e - b, distinct);
    });
  }

  // The same for `ids` ids of shard s (ids > 0); count_absent(shard, distinct) counts the
  // absent ones (Shard::count_absent; near the limit each id once, and with an admission
  // filter whether it will admit them or not: an earlier part of the same call, or a write
  // on another thread, may raise a count first), or is null: then room that would grow the
  // index or reach the shard's limit is not held, and false is returned. A write whose new
  // entries do not fit under kMaxRowsPerShard is a ValueError, before any entry changes.
  template <class CountAbsent>
  bool reserve_shard(size_t s, uint64_t ids, detail::HeldRoom& room, bool gated, uint64_t leaving, bool far_stamps,
                     CountAbsent&& count_absent) {
    detail::Shard& sh = *shards_[s];
    std::unique_lock<detail::SharedMutex> lk(sh.mu);
    auto beyond_leaving = [leaving](uint64_t entries) { return entries > leaving ? entries - leaving : 0; };
    uint64_t extra = ids;
    if (can_split() && sh.size() > kSplitEntriesPerShard)
      split_wanted_.store(true, std::memory_order_relaxed);  // an earlier write took it over
    if (sh.reserve_grows_index(beyond_leaving(extra)) || !sh.has_room_for(beyond_leaving(extra))) {
      if constexpr (std::is_same_v<std::decay_t<CountAbsent>, std::nullptr_t>) {
        return false;
      } else {
        extra = count_absent(sh, false);
        if (!sh.has_room_for(beyond_leaving(extra))) extra = count_absent(sh, true);
        if (beyond_leaving(extra) > 0 && !sh.has_room_for(beyond_leaving(extra)))
          throw ValueError(shard_full(s, sh, beyond_leaving(extra)));
      }
    }
    if (gated && has_filter_) sh.counts.reserve_new(sh.held() + extra);
    room.hold(s, sh, beyond_leaving(extra), far_stamps ? ids : 0);
    return true;
  }

  // Why a write of `adding` new entries to shard s does not fit (reserve_shard).
  static std::string shard_full(size_t s, const detail::Shard& sh, uint64_t adding) {
    std::string why = "shard " + std::to_string(s) + " of the table holds " + std::to_string(sh.size()) +
                      " entries and this write would add " + std::to_string(adding) + " more";
    if (sh.held() > 0)  // room of other writes: for their new entries, or for ids they find stored
      why += " beside room for up to " + std::to_string(sh.held()) + " that writes under way on other threads hold";
    return why + ": a shard holds at most " + std::to_string(detail::kMaxRowsPerShard) +
           " (give the table more shards: num_shards); the table was not changed";
  }

  // A one_bit segment has at most 4096 values (spec.h), which with_stack_floats holds.
  static_assert(kMaxNarrowDim >= 4096, "with_stack_floats holds a one_bit segment");
  // An automatic shard count (TableSpec::num_shards = 0) goes up to kAutoMaxShards, so that
  // no shard holds more than kSplitEntriesPerShard entries (a shard's index grows alone, so
  // the pause and the memory of a growth stay small) and no write has more than
  // kSplitIdsPerShard ids per shard (a write is spread over threads by shards). Below that,
  // fewer shards make small batches cheaper: each shard a batch touches costs two lock
  // round trips and two cold cache lines. 100 tables of 10,000 ids, 200-id Adagrad steps,
  // one C++ call over all of them, one thread: 816 us with 1 shard, 945 with 4, 1413 with 64.
  static constexpr uint64_t kAutoMaxShards = 64;
  static constexpr uint64_t kSplitEntriesPerShard = 16384;
  static constexpr uint64_t kSplitIdsPerShard = 4096;
  // How long a split waits for the batches under way to finish (new ones wait meanwhile)
  // before it gives up until the next write: longer than any batch but a huge one.
  static constexpr std::chrono::milliseconds kSplitWait{1000};
  static constexpr int64_t kNoTimestamp = INT64_MIN;  // a write that does not move max_update_ts
  // The widest row a streamed lookup passes through a compressor on the stack (1 KiB).
  static constexpr size_t kRetrieveBufferFloats = 256;

  TableSpec spec_;
  RowLayout layout_;
  const KernelSet* kernels_;
  std::vector<OptStepFn> steps_;
  NarrowStepFn narrow_step_ = nullptr;  // see the constructor
  mutable detail::SharedMutex writes_;  // the write gate (WriteHold, hold_writes)
  size_t widest_one_bit_ = 0;           // the dim of the widest one_bit segment
  std::unique_ptr<std::atomic<float>[]> hashnet_scale_;
  detail::SlotValues<int64_t> expire_seconds_;
  bool has_filter_ = false;
  uint64_t counts_forgotten_before_ = 0;  // by shards that were split (under the layout lock alone)
  detail::SlotValues<uint32_t> thresholds_;  // with an admission filter
  mutable std::mutex capacity_mu_;
  std::atomic<uint64_t> write_clock_{0};
  std::atomic<uint64_t> resets_{0};  // load_entries, reinitialize and evict calls (VictimPool)
  VictimPool pool_;                  // with capacity_mu_ held
  Room room_kept_;                   // the last capacity-limited write's room, with capacity_mu_ held
  std::atomic<uint64_t> evictions_{0};
  size_t read_bytes_ = 0;  // bytes of a row a lookup reads: header and values
  size_t fetches_ahead_ = kFetchesAhead;       // see block_for
  size_t read_block_ = 0, write_block_ = 0;  // items per block of read_blocks, of write_blocks
  bool raw_lookup_ = true;
  bool has_hashnet_ = false;
  bool bfloat16_wrapped_ = false;  // a float16 wrapper's segment in a bfloat16 table
  bool needs_step_ = false;
  // Shards: 2^shard_bits_ of them, picked by the top bits of an id's hash. The layout lock is
  // held shared by every batch (LayoutHold) and taken alone only to split the shards.
  mutable detail::SharedMutex layout_mu_;
  bool fixed_shards_ = false;
  int max_shard_bits_ = 0;
  int shard_bits_ = 0;
  std::vector<detail::Shard*> shards_;
  std::atomic<bool> split_wanted_{false};
  std::atomic<uint64_t> split_batch_{0};  // the largest write batch asking for a split since the last one
  mutable std::atomic<bool> split_pending_{false};  // a thread waits to split: new batches wait
  std::atomic<int64_t> split_retry_at_{0};  // steady_clock ticks before which maybe_split tries nothing
  mutable std::atomic<int> pins_{0};
  std::atomic<int64_t> max_update_ts_{0};
};

}  // namespace mtht
