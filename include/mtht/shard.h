// One shard of a table: its index (buckets of 4 slots of id, row and timestamp, probed
// linearly; see the top of table.h) and its rows (RowArena), under one lock. Also the
// memory helpers of the batch loops: prefetches and row copies.
#pragma once

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "mtht/buffer.h"
#include "mtht/count_map.h"
#include "mtht/errors.h"
#include "mtht/hash.h"
#include "mtht/shared_mutex.h"
#include "mtht/spec.h"

namespace mtht {

// Where one entry's data is: its row of values then state, and, with a capacity limit, its
// write clock and write count. The id and timestamp are in the index bucket.
struct EntryRef {
  float* values;
  uint64_t* meta;  // [clock, writes] or null
};

namespace detail {

constexpr uint32_t kEmpty = 0;
constexpr int kBucketSlots = 4;
// A slot's word holds its row + 1 in the low kRowBits bits and, in the high bits, a piece of
// the bucket's overflow count (4 bits from each of the 4 words).
constexpr int kRowBits = 28;
constexpr uint32_t kRowMask = (uint32_t{1} << kRowBits) - 1;
// Entries (and rows) a shard holds at most: row + 1 must fit in kRowBits. A C++ check may
// define MTHT_MAX_ROWS_PER_SHARD lower, to reach the limit with few entries.
#ifdef MTHT_MAX_ROWS_PER_SHARD
constexpr uint64_t kMaxRowsPerShard = MTHT_MAX_ROWS_PER_SHARD;
static_assert(kMaxRowsPerShard <= kRowMask - 1, "a row number must fit in kRowBits");
#else
constexpr uint64_t kMaxRowsPerShard = kRowMask - 1;
#endif
// The most overflows a bucket counts. One that reaches it stays there (a probe then goes on
// past it, which is only slower), until the index is rewritten.
constexpr uint32_t kMaxOverflow = 0xFFFF;
// A slot's 32-bit timestamp when the entry's timestamp is outside [0, kTsApart): the
// shard keeps that one apart (Shard::far_ts_).
constexpr uint32_t kTsApart = 0xFFFFFFFFu;

// One cache line of the index: 4 slots of (id, row + 1, timestamp), and the overflow count.
struct alignas(64) Bucket {
  int64_t key[kBucketSlots];
  uint32_t word[kBucketSlots];  // row + 1 (kEmpty when the slot is free), and overflow bits
  uint32_t ts[kBucketSlots];    // the timestamp, or kTsApart

  uint32_t row_plus_one(int j) const { return word[j] & kRowMask; }
  bool taken(int j) const { return row_plus_one(j) != kEmpty; }
  void set_row_plus_one(int j, uint32_t v) { word[j] = (word[j] & ~kRowMask) | v; }
  // Entries stored past this bucket whose probe passed through it (at most kMaxOverflow).
  uint32_t overflow() const {
    uint32_t o = 0;
    for (int j = 0; j < kBucketSlots; ++j) o |= (word[j] >> kRowBits) << (4 * j);
    return o;
  }
  bool overflowed() const { return ((word[0] | word[1] | word[2] | word[3]) & ~kRowMask) != 0; }
  void set_overflow(uint32_t o) {
    for (int j = 0; j < kBucketSlots; ++j) word[j] = (word[j] & kRowMask) | (((o >> (4 * j)) & 0xF) << kRowBits);
  }
  void add_overflow() {
    const uint32_t o = overflow();
    if (o < kMaxOverflow) set_overflow(o + 1);
  }
  void drop_overflow() {
    const uint32_t o = overflow();
    if (o < kMaxOverflow) set_overflow(o - 1);
  }
};
static_assert(sizeof(Bucket) == 64, "a bucket is one cache line");
// overflowed() and Shard::matches read the four slots at once.
static_assert(kBucketSlots == 4 && (kMaxOverflow >> (4 * kBucketSlots)) == 0, "4 slots, 4 overflow bits each");

// The top bits of an id's hash choose its shard (up to 4096 shards); the bits below choose
// its home bucket.
constexpr int kShardHashBits = 12;

// The home bucket of hash h among nb buckets: the next bits of h scaled to [0, nb), so that
// nb need not be a power of two, and entries keep their order from a smaller index to a
// larger one (a rehash writes the new index almost front to back).
inline uint64_t bucket_of(uint64_t h, uint64_t nb) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(h << kShardHashBits) * nb) >> 64);
}

// Prefetches the cache line of p, in a way the compiler cannot drop. GCC 12 at -O3 removed
// the row prefetches of the batch loops written with __builtin_prefetch (seen in the
// generated code): a full miss per row.
inline void prefetch(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__aarch64__)
  asm volatile("prfm pldl1keep, %a0" : : "p"(p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Every cache line of [p, p + bytes).
inline void prefetch_lines(const void* p, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(p) + bytes - 1;
  for (uintptr_t line = first; line <= last; line += 64) prefetch(reinterpret_cast<const void*>(line));
}

// Copies a row of `bytes` bytes: a short row that is a multiple of 32 bytes in 32-byte
// steps, inline (memcpy of a size known only at run time is a call into the C library:
// 1M ids, dim 16, Zipf ids, one thread, lookups 64.3 -> 68.5 M ids/s), a longer one with
// memcpy (at dim 64 the steps were 3% slower).
inline void copy_row(float* dst, const float* src, size_t bytes) {
  if (bytes % 32 != 0 || bytes > 128) {
    std::memcpy(dst, src, bytes);
    return;
  }
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  for (size_t i = 0; i < bytes; i += 32) std::memcpy(d + i, s + i, 32);
}

// A lookup whose output is at least this large writes it with streaming stores (straight to
// memory, without reading each output line in first): an output this large leaves the cache
// before the caller reads it anyway. Measured with a lookup followed by a product reading
// every value, one thread, 1M ids (32 MB of L3): at dim 64, batches of 8 MB of output ran
// 5% slower streamed, of 16 MB 6% faster, of 32 MB 32% faster; at dim 16, 16 MB: 9% faster.
constexpr size_t kStreamedOutputBytes = size_t{16} << 20;

// Whether copy_row_streamed can write rows of `bytes` bytes to `dst`.
inline bool can_stream(const float* dst, size_t bytes) {
#if defined(__SSE2__)
  return bytes % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
#else
  (void)dst, (void)bytes;
  return false;
#endif
}

// copy_row with streaming stores (see kStreamedOutputBytes); can_stream(dst, bytes). The
// writer calls end_streaming() once its rows are written.
inline void copy_row_streamed(float* dst, const float* src, size_t bytes) {
#if defined(__SSE2__)
  for (size_t i = 0; i < bytes / sizeof(float); i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#else
  copy_row(dst, src, bytes);
#endif
}

// Orders the streaming stores before whatever the thread does next (they are weakly ordered).
inline void end_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// A batch's own rows, one per input position (gradients, values): read in shard order,
// they are read at random, so the batch loops prefetch them with the entries.
struct BatchRows {
  const void* base = nullptr;
  size_t stride = 0;  // bytes per position
  void operator()(size_t i) const {
    if (base) prefetch_lines(static_cast<const char*>(base) + i * stride, stride);
  }
};

// Rows of one shard in chunks of 16, 32, 64, ... rows; a row never moves. Each column
// (values+state, and the optional capacity bookkeeping) has its own chunks. The first
// column's stride and chunk addresses are kept in the arena itself, beside the shard's
// other hot fields: a batch over many small tables meets most shards cold, and finding a
// row through the chunk vectors took three more cache misses per shard.
class RowArena {
 public:
  static constexpr uint32_t kFirstChunkRows = 16;
  static constexpr int kMaxChunks = 29;  // enough for kMaxRowsPerShard rows

  // The free rows are linked through 4 bytes of their last column, at `link_offset`.
  explicit RowArena(std::vector<size_t> strides, size_t link_offset = 0)
      : first_stride_(strides.at(0)), strides_(std::move(strides)), chunks_(strides_.size()),
        link_column_(strides_.size() - 1), link_offset_(link_offset) {
    for (auto& column : chunks_) column.reserve(kMaxChunks);  // so that adding a chunk cannot fail half-way
  }

  uint32_t rows_used() const { return used_; }
  uint64_t capacity() const { return capacity_; }
  uint64_t bytes() const {
    uint64_t b = 0;
    for (const auto& col : chunks_)
      for (const auto& c : col) b += c.bytes();
    return b;
  }
  size_t row_bytes() const {
    size_t b = 0;
    for (size_t s : strides_) b += s;
    return b;
  }

  // Row r of the first column.
  char* row(uint32_t r) const {
    return reinterpret_cast<char*>(first_bases_[chunk_of(r)] + static_cast<uintptr_t>(r) * first_stride_);
  }

  char* at(size_t column, uint32_t r) const {
    if (column == 0) return row(r);
    const int c = chunk_of(r);
    return static_cast<char*>(chunks_[column][c].data()) + static_cast<size_t>(r - first_row(c)) * strides_[column];
  }

  // fn(r, at(column, r)) for every `step`-th row in use, in order, walking each chunk with
  // a pointer rather than finding every row's chunk.
  template <class Fn>
  void for_each_in_column(size_t column, uint64_t step, Fn&& fn) const {
    const size_t stride = strides_[column];
    for (size_t c = 0; c < chunks_[column].size(); ++c) {
      const uint64_t first = first_row(static_cast<int>(c));
      if (first >= used_) break;
      const uint64_t end = std::min<uint64_t>(used_, first + (uint64_t{kFirstChunkRows} << c));
      const char* base = static_cast<const char*>(chunks_[column][c].data());
      for (uint64_t r = (first + step - 1) / step * step; r < end; r += step)
        fn(static_cast<uint32_t>(r), base + static_cast<size_t>(r - first) * stride);
    }
  }

  // Make room for `rows` rows in total (allocates; changes nothing visible).
  void reserve(uint64_t rows) {
    if (rows > kMaxRowsPerShard) throw std::bad_alloc();
    while (capacity_ < rows) {
      const uint64_t n = static_cast<uint64_t>(kFirstChunkRows) << chunks_[0].size();
      // Every column's chunk is made before any is added: a failed allocation leaves the
      // arena as it was.
      std::vector<Buffer> made;
      made.reserve(strides_.size());
      for (size_t col = 0; col < strides_.size(); ++col) made.emplace_back(static_cast<size_t>(n * strides_[col]));
      for (size_t col = 0; col < strides_.size(); ++col) chunks_[col].push_back(std::move(made[col]));
      const int c = static_cast<int>(chunks_[0].size()) - 1;
      first_bases_[c] = reinterpret_cast<uintptr_t>(chunks_[0].back().data()) -
                        static_cast<uintptr_t>(first_row(c)) * first_stride_;
      capacity_ += n;
    }
  }

  uint32_t allocate() {
    if (free_count_ > 0) {
      const uint32_t r = free_head_;
      std::memcpy(&free_head_, at(link_column_, r) + link_offset_, sizeof free_head_);
      --free_count_;
      // The next free row is the next insert's (its link is read then, and every column
      // written): its first lines are fetched now, so that the insert does not wait on
      // memory for them (capacity-limited writes, whose new entries take their victims'
      // rows: 1M entries at their limit, steps of 65,536 ids, C++ loop: 5% less time).
      if (free_count_ > 0)
        for (size_t col = 0; col < strides_.size(); ++col) prefetch(at(col, free_head_));
      return r;
    }
    reserve(static_cast<uint64_t>(used_) + 1);
    // A fresh row is fetched ahead for the next insert too: a write in input order hands out
    // the rows of all its shards in turn, and the hardware does not follow that many
    // streams (filling 2M ids on one thread: 0.36 s without this, 0.24 with it).
    const uint32_t r = used_++;
    if (used_ < capacity_)
      for (size_t col = 0; col < strides_.size(); ++col) prefetch_lines(at(col, used_), strides_[col]);
    return r;
  }

  // The free rows are a list threaded through their own bytes, so that removing entries
  // allocates nothing (an eviction comes after every allocation of its write). With
  // capacity bookkeeping, through that: an eviction has just read it, and the row itself
  // is then not touched until it is reused (1M dim-16 Adagrad entries at their limit,
  // steps of 65,536 ids of which a tenth new, C++ loop: 5% faster, LRU and LFU).
  void release(uint32_t r) {
    std::memcpy(at(link_column_, r) + link_offset_, &free_head_, sizeof free_head_);
    free_head_ = r;
    ++free_count_;
  }

 private:
  static int chunk_of(uint32_t r) { return 31 - __builtin_clz(r / kFirstChunkRows + 1); }
  static uint32_t first_row(int c) { return kFirstChunkRows * ((1u << c) - 1); }

  size_t first_stride_;
  // Chunk c of the first column, less first_row(c) rows (modulo 2^64): row r's address is
  // then first_bases_[c] + r * first_stride_ (lookups in cache, C++ loop: 1.4% to 1.8%).
  uintptr_t first_bases_[kMaxChunks] = {};
  std::vector<size_t> strides_;
  std::vector<std::vector<Buffer>> chunks_;  // [column][chunk]
  uint64_t capacity_ = 0;
  uint32_t used_ = 0;
  uint32_t free_head_ = 0;   // the last row released, if free_count_ > 0
  uint64_t free_count_ = 0;
  size_t link_column_, link_offset_;
};

// One independently locked part of the table. The fields a batch reads first, the lock and
// the index, share the first cache line, and the rows' addresses fill the next.
class alignas(64) Shard {
 public:
  // `phase_ppm`: s / n in millionths for shard s of a table of n, which sets where its
  // index grows once it is large (past_growth_point): the shards of a table fill at one
  // pace, and would otherwise all grow in the same batch.
  Shard(size_t stride, bool with_meta, uint32_t max_load_permille, uint32_t phase_ppm)
      : max_load_permille_(max_load_permille),
        with_meta_(with_meta),
        growth_ppm_(static_cast<uint32_t>(uint64_t{max_load_permille} * 1000 -
                                          uint64_t{max_load_permille} * 1000 * phase_ppm / (kGrowthSpread * 1000000))),
        rows_(with_meta ? RowArena(std::vector<size_t>{stride, 16}, sizeof(uint64_t)) : RowArena({stride})) {}

  mutable SharedMutex mu;

  // The write clock of a free row's bookkeeping, which no write reaches: a scan of the rows
  // in order tells them from the entries' by it.
  static constexpr uint64_t kFreeRow = UINT64_MAX;

  size_t size() const { return size_; }
  const RowArena& rows() const { return rows_; }
  uint64_t slots() const { return nb_ * kBucketSlots; }
  uint64_t index_bytes() const { return index_.bytes(); }

  EntryRef entry(uint32_t r) const {
    return EntryRef{reinterpret_cast<float*>(rows_.row(r)),
                    with_meta_ ? reinterpret_cast<uint64_t*>(rows_.at(1, r)) : nullptr};
  }

  const Bucket* home(uint64_t h) const { return buckets() + bucket_of(h, nb_); }

  // The home bucket of hash h, and the shard's second line (the rows' addresses), which a
  // batch over many small tables finds cold.
  void prefetch_group(uint64_t h) const {
    prefetch(reinterpret_cast<const char*>(this) + 64);
    if (nb_) prefetch(home(h));
  }

  // Slot of `id`: its bucket and position, or null.
  struct Slot {
    Bucket* bucket;
    int j;
    uint32_t row() const { return bucket->row_plus_one(j) - 1; }
  };

  // A timestamp as a slot holds it: itself, or kTsApart when it does not fit.
  static uint32_t near_ts(int64_t t) { return t >= 0 && t < int64_t{kTsApart} ? static_cast<uint32_t>(t) : kTsApart; }

  // The timestamp of entry `id` whose slot holds `near` (near_ts of it).
  int64_t ts_of(int64_t id, uint32_t near) const {
    return near != kTsApart ? near : static_cast<int64_t>(*far_ts_.find(id, hash_id(id)));
  }
  // The timestamp of the entry in slot j of `b` (a bucket of this shard).
  int64_t ts_at(const Bucket& b, int j) const { return ts_of(b.key[j], b.ts[j]); }
  int64_t ts_of(const Slot& s) const { return ts_at(*s.bucket, s.j); }

  // Sets the timestamp of a write. One equal to the stored timestamp is not stored, so the
  // bucket's line stays clean and is not written back to memory: writes without req_time
  // (0), and writes in the second of the entry's last one (1M-id dim-64 Adagrad steps,
  // C++ loop: 2.5% faster on one thread and on two). A timestamp kept apart needs room
  // held for it (hold(extra, far)), so that this allocates nothing.
  void stamp(const Slot& s, int64_t t) {
    uint32_t& at = s.bucket->ts[s.j];
    const uint32_t v = near_ts(t);
    if (v == kTsApart) {
      *far_ts_.try_emplace(s.bucket->key[s.j], hash_id(s.bucket->key[s.j])).first = static_cast<uint64_t>(t);
    } else if (at == kTsApart) {
      far_ts_.erase(s.bucket->key[s.j], hash_id(s.bucket->key[s.j]));
    }
    if (at != v) at = v;
  }

  // Where a write reaches an entry: its slot and its row (a null bucket: none).
  struct Found {
    Slot slot;
    EntryRef entry;
  };

  // Changes whenever the index is rewritten (rehash): a slot found before stays valid as
  // long as this does not change and the shard stays locked, as inserts move no entry.
  uint32_t index_version() const { return index_version_; }

  // A probe ends at the first bucket that holds the id, or that no entry passed over. Slots
  // are compared without a branch each (which slot holds an id is random, so such branches
  // would mispredict).
  Slot find(int64_t id, uint64_t h) const {
    if (!nb_) return Slot{nullptr, 0};
    Bucket* base = buckets();
    for (uint64_t b = bucket_of(h, nb_);; b = next(b, nb_)) {
      const unsigned m = matches(base[b], id);
      if (m) return Slot{&base[b], __builtin_ctz(m)};
      if (!base[b].overflowed()) return Slot{nullptr, 0};
    }
  }

  // Fetches the bookkeeping of the row of `id` if it is stored (its bucket should be in the
  // cache by then: prefetch_group).
  void prefetch_meta(int64_t id, uint64_t h) const {
    const Slot slot = find(id, h);
    if (slot.bucket && with_meta_) prefetch(entry(slot.row()).meta);
  }

  // How many of ids[0, n) (hashes alongside) are not stored. Each block of 16 ids is looked
  // for while the next block's home buckets are fetched: one find after another would wait
  // for memory each time (assign_add of ids already stored, 1M ids, one thread, when a
  // batch's ids would take the index past its bound and must be counted: 16.0 against 36.7
  // M ids/s away from the bound, before).
  // With `distinct`, an id absent more than once counts once (it sorts the absent ids: only
  // near kMaxRowsPerShard, for a write that would not fit otherwise).
  uint64_t count_absent(const int64_t* ids, const uint64_t* hashes, size_t n, bool distinct = false) const {
    constexpr size_t K = 16;
    uint64_t absent = 0;
    std::vector<int64_t> absent_ids;
    for (size_t k = 0; k < std::min(n, K); ++k) prefetch_group(hashes[k]);
    for (size_t b = 0; b < n; b += K) {
      for (size_t k = b + K, e = std::min(n, b + 2 * K); k < e; ++k) prefetch_group(hashes[k]);
      for (size_t k = b, e = std::min(n, b + K); k < e; ++k) {
        const bool missing = find(ids[k], hashes[k]).bucket == nullptr;
        absent += missing;
        if (distinct && missing) absent_ids.push_back(ids[k]);
      }
    }
    if (!distinct) return absent;
    std::sort(absent_ids.begin(), absent_ids.end());
    return static_cast<uint64_t>(std::unique(absent_ids.begin(), absent_ids.end()) - absent_ids.begin());
  }

  // Whether `extra` more entries fit in the shard beside those it holds and the room held
  // by writes under way.
  bool has_room_for(uint64_t extra) const { return size_ + held() + extra <= kMaxRowsPerShard; }

  // The slot of `id` if its home bucket (already in cache) holds it. Otherwise a null slot,
  // and when entries have overflowed past home (so `id` may lie further) the next bucket is
  // prefetched and *further is set; the bucket after it too when more than one entry passed
  // home, a sign of a long run (1M ids at load 0.64, C++ loop, one thread, 8 paired runs:
  // lookups 5.6% faster; level at the default bound's 0.32).
  Slot find_at_home(int64_t id, uint64_t h, bool* further) const {
    *further = false;
    if (!nb_) return Slot{nullptr, 0};
    const uint64_t at = bucket_of(h, nb_);
    Bucket* b = buckets() + at;
    const unsigned m = matches(*b, id);
    if (m) return Slot{b, __builtin_ctz(m)};
    if (b->overflowed()) {
      *further = true;
      const uint64_t at1 = next(at, nb_);
      prefetch(buckets() + at1);
      if (b->overflow() > 1) prefetch(buckets() + next(at1, nb_));
    }
    return Slot{nullptr, 0};
  }

  // Bit j set when slot j of `b` holds `id`. With SSE2, the four ids and the four words are
  // compared two and four at a time (14 instructions, against 30 one slot at a time).
  static unsigned matches(const Bucket& b, int64_t id) {
#if defined(__SSE2__)
    const __m128i want = _mm_set1_epi64x(id);
    // 64-bit equality from 32-bit halves: each half must match, and so must its neighbour.
    auto equal_pairs = [&](const int64_t* two) {
      const __m128i e = _mm_cmpeq_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(two)), want);
      return static_cast<unsigned>(
          _mm_movemask_pd(_mm_castsi128_pd(_mm_and_si128(e, _mm_shuffle_epi32(e, _MM_SHUFFLE(2, 3, 0, 1))))));
    };
    const unsigned ids = equal_pairs(b.key) | equal_pairs(b.key + 2) << 2;
    const __m128i rows = _mm_and_si128(_mm_load_si128(reinterpret_cast<const __m128i*>(b.word)),
                                       _mm_set1_epi32(static_cast<int>(kRowMask)));
    const unsigned free = static_cast<unsigned>(
        _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(rows, _mm_setzero_si128()))));
    return ids & ~free;
#else
    unsigned m = 0;
    for (int j = 0; j < kBucketSlots; ++j) m |= static_cast<unsigned>((b.key[j] == id) & b.taken(j)) << j;
    return m;
#endif
  }

  // Whether reserve(extra) would grow the index. (A chunk of rows reserved too early costs
  // only address space: its pages are not touched until rows are handed out.)
  bool reserve_grows_index(uint64_t extra) const {
    const uint64_t want = std::min<uint64_t>(size_ + held() + extra, kMaxRowsPerShard);
    return past_growth_point(want) && (past_growth_point(size_ + held()) || over_slack(want));
  }

  // Make room for `extra` more entries besides the room held by writes in progress, so that
  // inserting them allocates nothing. An index below its growth point (past_growth_point)
  // that `extra` would take past it, but not past the slack above the bound (over_slack), is
  // left to grow after the write (grow_if_due): were it grown now, a write of ids mostly
  // stored already would have to count its absent ids first, not to grow the index for
  // nothing.
  void reserve(uint64_t extra) {
    const uint64_t want = std::min<uint64_t>(size_ + held() + extra, kMaxRowsPerShard);
    rows_.reserve(std::min<uint64_t>(static_cast<uint64_t>(rows_.rows_used()) + held() + extra, kMaxRowsPerShard));
    if (reserve_grows_index(extra))
      rehash(buckets_for(want));
    else if (past_growth_point(want))
      grow_due_.store(true, std::memory_order_relaxed);
  }

  // After a write: the index grows if the write's inserts took it past its growth point. A
  // failed allocation leaves it there (within the slack) until the next write's reserve, the
  // write itself being done.
  void grow_if_due() {
    if (!grow_due_.load(std::memory_order_relaxed)) return;
    std::unique_lock<SharedMutex> lk(mu);
    grow_due_.store(false, std::memory_order_relaxed);
    if (!past_growth_point(size_)) return;
    try {
      rehash(buckets_for(std::min<uint64_t>(size_ + held(), kMaxRowsPerShard)));
    } catch (const std::bad_alloc&) {
    }
  }

  // reserve(extra), then hold that room for the caller's write until release(extra): other
  // writes reserve room beside it, so they cannot use it up. (Without this, a write that
  // found room reserved by another write still in progress could take it, and that write's
  // inserts would then allocate, and could fail, half-way through it.) `far`: the write
  // stamps that many entries with a timestamp kept apart (stamp), which need room there
  // too. The caller holds mu.
  void hold(uint64_t extra, uint64_t far = 0) {
    reserve(extra);
    if (far) {
      far_ts_.reserve(far_ts_.size() + far_held_.load(std::memory_order_relaxed) + far);
      far_held_.fetch_add(far, std::memory_order_relaxed);
    }
    held_.fetch_add(extra, std::memory_order_relaxed);
  }
  // Any thread, with or without mu: room held only ever makes other writes reserve more.
  void release(uint64_t extra, uint64_t far = 0) {
    held_.fetch_sub(extra, std::memory_order_relaxed);
    if (far) far_held_.fetch_sub(far, std::memory_order_relaxed);
  }
  uint64_t held() const { return held_.load(std::memory_order_relaxed); }
  // Entries whose timestamp is kept apart, and the memory that takes.
  size_t far_timestamps() const { return far_ts_.size(); }
  size_t far_timestamp_bytes() const { return far_ts_.bytes(); }

  // Slot of `id`, inserting it (with a new row, for the caller to initialise) if absent.
  // Allocates only when no room was reserved (or an id counted present at the reservation
  // was removed before the write).
  Slot find_or_insert(int64_t id, uint64_t h, bool* inserted) {
    const Slot found = find(id, h);
    if (found.bucket) {
      *inserted = false;
      return found;
    }
    if (over_slack(size_ + 1)) reserve(1);
    if (past_growth_point(size_ + 1)) grow_due_.store(true, std::memory_order_relaxed);
    const uint32_t r = rows_.allocate();
    Slot slot = place(buckets(), nb_, h, id, 0, r + 1);
    ++size_;
    *inserted = true;
    return slot;
  }

  // Calls fn(id, ts, row) for every entry, in row order (sequential reads of the rows).
  template <class Fn>
  void for_each_entry(Fn&& fn) const {
    struct Row {
      int64_t key, ts;
      bool live;
    };
    std::vector<Row> by_row(rows_.rows_used(), Row{0, 0, false});
    const Bucket* base = buckets();
    for (uint64_t b = 0; b < nb_; ++b)
      for (int j = 0; j < kBucketSlots; ++j) {
        const uint32_t v = base[b].row_plus_one(j);
        if (v == kEmpty) continue;
        by_row[v - 1] = Row{base[b].key[j], ts_at(base[b], j), true};
      }
    for (uint32_t r = 0; r < by_row.size(); ++r)
      if (by_row[r].live) fn(by_row[r].key, by_row[r].ts, r);
  }

  // An entry copied out of the index: its id, and its timestamp and row + 1 as its slot
  // holds them (ts_of(Copied) gives the timestamp).
  struct Copied {
    int64_t key;
    uint32_t ts;
    uint32_t row;
  };
  int64_t ts_of(const Copied& c) const { return ts_of(c.key, c.ts); }
  static constexpr size_t kRunBuckets = 64;
  // A scan fetches each bucket this many buckets ahead: read in order, the index still came
  // in slower than the scan used it. A capacity-limited table of 1M entries choosing its
  // victims by a scan, C++ loop, one thread, medians of 32 scans: a write that scans took
  // 17.4 ms more than one that did not, 16.9 with candidates_up_to's cheaper addresses
  // alone, 14.0 with this too.
  static constexpr uint64_t kScanAhead = 16;
  // fn(entries, n) for the n entries of each run of kRunBuckets buckets, in index order.
  // They are copied out without a branch per slot: which slots are taken is random, and
  // such a branch mispredicts at every other slot (a rehash took 12.7 ns per entry with
  // one, 10 without).
  template <class Fn>
  void for_each_run(Fn&& fn) const {
    const Bucket* src = buckets();
    Copied copied[kRunBuckets * kBucketSlots];
    for (uint64_t first = 0; first < nb_; first += kRunBuckets) {
      size_t n = 0;
      for (uint64_t b = first, last = std::min(nb_, first + kRunBuckets); b < last; ++b) {
        if (b + kScanAhead < nb_) prefetch(src + b + kScanAhead);
        for (int j = 0; j < kBucketSlots; ++j) {
          copied[n] = Copied{src[b].key[j], src[b].ts[j], src[b].row_plus_one(j)};
          n += src[b].taken(j);
        }
      }
      fn(static_cast<const Copied*>(copied), n);
    }
  }

  // Removes the entry of `id` (h = hash_id(id)), if there is one; returns whether there was.
  // Its row is reused by later inserts; the buckets its probe passed over count one
  // overflow less.
  bool erase(int64_t id, uint64_t h) {
    const Slot slot = find(id, h);
    if (!slot.bucket) return false;
    remove(static_cast<uint64_t>(slot.bucket - buckets()), slot.j, h);
    return true;
  }

  // Removes every entry for which drop(id, ts, row) is true; returns how many. Their rows are
  // reused by later inserts; the buckets their probes passed over count one overflow less.
  template <class Pred>
  uint64_t erase_if(Pred&& drop) {
    Bucket* base = buckets();
    uint64_t removed = 0;
    for (uint64_t b = 0; b < nb_; ++b)
      for (int j = 0; j < kBucketSlots; ++j) {
        const uint32_t v = base[b].row_plus_one(j);
        if (v == kEmpty || !drop(base[b].key[j], ts_at(base[b], j), v - 1)) continue;
        remove(b, j, hash_id(base[b].key[j]));
        ++removed;
      }
    return removed;
  }

  uint64_t max_probe_groups() const {
    uint64_t worst = 0;
    const Bucket* base = buckets();
    for (uint64_t b = 0; b < nb_; ++b)
      for (int j = 0; j < kBucketSlots; ++j) {
        if (!base[b].taken(j)) continue;
        const uint64_t home = bucket_of(hash_id(base[b].key[j]), nb_);
        const uint64_t distance = (b >= home ? b - home : b + nb_ - home) + 1;
        worst = std::max(worst, distance);
      }
    return worst;
  }

 private:
  Bucket* buckets() const { return static_cast<Bucket*>(index_.data()); }
  bool over_load(uint64_t used) const { return used * 1000 > slots() * max_load_permille_; }
  // Whether `used` entries take the index past the load at which it grows: the bound, or,
  // for an index mapped on its own (over 2 MiB), the shard's growth point, a little below
  // it. The shards of a table fill at one pace, so with one point they all grew in the same
  // batch or two, which waited for every shard's rewrite; shard s of n grows at
  // 1 - s / (kGrowthSpread n) of the bound, so such growths are spread over the batches
  // that add the last 1/kGrowthSpread below it. A reservation leaves an eighth to spare
  // (buckets_for), so a table reserved to its size never grows early. The pooled indexes,
  // of up to 2 MiB, double at the bound.
  bool past_growth_point(uint64_t used) const {
    if (nb_ * sizeof(Bucket) <= Buffer::kHugePage) return over_load(used);
    return used * 1000000 > slots() * growth_ppm_;
  }
  // Past the bound and a quarter of the slots left above it (at the default bound of 1/2:
  // past 5/8). A write's inserts never take an index this far (reserve).
  bool over_slack(uint64_t used) const {
    return used * 4000 > slots() * (3 * max_load_permille_ + 1000);
  }

  static uint64_t next(uint64_t b, uint64_t nb) { return b + 1 == nb ? 0 : b + 1; }

  // Frees slot j of bucket b, whose entry's hash is h: the buckets its probe passed over
  // count one overflow less, and its row goes to the free list.
  void remove(uint64_t b, int j, uint64_t h) {
    Bucket* base = buckets();
    for (uint64_t t = bucket_of(h, nb_); t != b; t = next(t, nb_)) base[t].drop_overflow();
    if (base[b].ts[j] == kTsApart) far_ts_.erase(base[b].key[j], h);
    const uint32_t r = base[b].row_plus_one(j) - 1;
    if (with_meta_) entry(r).meta[0] = kFreeRow;
    rows_.release(r);
    base[b].set_row_plus_one(j, kEmpty);
    --size_;
  }

  // The buckets of an index that holds `want` entries at the bound. An index of up to 2 MiB
  // is a pooled piece, whose size is a power of two anyway: its bucket count is too, and it
  // doubles. A larger one is mapped: it grows by half, so its load stays between 2/3 of the
  // bound and the bound, and a table's memory grows by steps of at most half its index.
  // (Growing by a quarter saved 19% of the index against doubling, by half 13%, but took
  // 29% more CPU time to fill a table, against 16%: every growth rewrites the whole index;
  // see docs/design.md.) A reservation of more (initial_capacity, a large batch of new ids)
  // leaves an eighth to spare: a shard left at its bound counts the absent ids of every
  // write whose share would take it past its slack first (count_absent), which made Adagrad
  // steps on a 10M-id table reserved to the entry 25% slower.
  uint64_t buckets_for(uint64_t want) const {
    const uint64_t per_bucket = uint64_t{kBucketSlots} * max_load_permille_;  // entries x 1000
    const uint64_t need = std::max<uint64_t>(1, (want * 1000 + per_bucket - 1) / per_bucket);
    if (need * sizeof(Bucket) <= Buffer::kHugePage) {
      uint64_t nb = 1;
      while (nb < need) nb *= 2;
      return nb;
    }
    // Whole huge pages: the tail of a mapping that ends inside one gets 4 KiB pages, and the
    // TLB misses on it made lookups 10% to 15% slower with a fifth of the index there.
    const uint64_t nb = std::max(need + need / 8, nb_ + nb_ / 2);
    return (nb + kBucketsPerHugePage - 1) / kBucketsPerHugePage * kBucketsPerHugePage;
  }
  static constexpr uint64_t kBucketsPerHugePage = Buffer::kHugePage / sizeof(Bucket);

  // Puts an entry in the first bucket from its home with a free slot, counting an overflow
  // on every full bucket passed.
  // `ts` as a slot holds it (near_ts).
  static Slot place(Bucket* base, uint64_t nb, uint64_t h, int64_t id, uint32_t ts, uint32_t row_plus_one) {
    for (uint64_t b = bucket_of(h, nb);; b = next(b, nb)) {
      Bucket& k = base[b];
      unsigned free = 0;
      for (int j = 0; j < kBucketSlots; ++j) free |= static_cast<unsigned>(!k.taken(j)) << j;
      if (free) {
        const int j = __builtin_ctz(free);
        k.key[j] = id;
        k.ts[j] = ts;
        k.set_row_plus_one(j, row_plus_one);
        return Slot{&k, j};
      }
      k.add_overflow();
    }
  }

  // Rewrites the index into nb buckets. The entries of a run of buckets are first copied
  // out without a branch per slot (which slots are taken is random, so such branches
  // mispredict), then placed.
  void rehash(uint64_t nb) {
    Buffer fresh(static_cast<size_t>(nb * sizeof(Bucket)));
    Bucket* dst = static_cast<Bucket*>(fresh.data());
    for_each_run([&](const Copied* moved, size_t n) {
      for (size_t i = 0; i < n; ++i) place(dst, nb, hash_id(moved[i].key), moved[i].key, moved[i].ts, moved[i].row);
    });
    index_ = std::move(fresh);
    nb_ = nb;
    ++index_version_;
  }

  uint32_t max_load_permille_;
  uint32_t index_version_ = 0;  // see index_version()
  uint64_t nb_ = 0;  // buckets (buckets_for)
  Buffer index_;
  uint64_t size_ = 0;
  std::atomic<uint64_t> held_{0};  // room held by writes in progress (hold)
  std::atomic<bool> grow_due_{false};  // inserts may have taken the index past its growth point (reserve)
  bool with_meta_;
  uint32_t growth_ppm_;  // past_growth_point
  RowArena rows_;
  // The timestamps that do not fit a slot (outside [0, kTsApart)), by id; such timestamps are
  // rare (a req_time before 1970 or after 2106), so a slot keeps 32 bits and a bucket holds 4
  // entries rather than 3.
  CountMap far_ts_;
  std::atomic<uint64_t> far_held_{0};  // room in far_ts_ held by writes in progress (hold)

 public:
  // Admission filter state: occurrences seen of ids that are not (yet) in this shard.
  AdmissionCounts counts;
};

}  // namespace detail
}  // namespace mtht
