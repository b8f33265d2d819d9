// Plain description of a table: what an entry is made of and how it is trained.
// Built by the Python configuration layer; validated here once, when a table is made.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mtht/errors.h"
#include "mtht/spec_types.h"

namespace mtht {

// Number of float32 words of optimizer state one segment keeps per entry (an int64 takes two).
inline int state_floats(const SegmentSpec& s) {
  const int d = s.dim;
  switch (static_cast<OptKind>(s.opt)) {
    case OptKind::kSgd: return 0;
    case OptKind::kAdagrad: return d;
    case OptKind::kDynamicWdAdagrad: return d + 2;
    case OptKind::kAdadelta: return 2 * d;
    case OptKind::kAdam: return 2 * d + 2;
    case OptKind::kAmsgrad: return 3 * d + 2;
    case OptKind::kFtrl: return 2 * d;
    case OptKind::kGroupFtrl: return 2 * d;
    case OptKind::kGroupAdagrad: return 1;
    case OptKind::kMomentum: return d;
    case OptKind::kMovingAverage: return 0;
    case OptKind::kRmsprop: return d;
    case OptKind::kRmspropV2: return d;
    case OptKind::kBatchSoftmax: return 2;
  }
  return 0;
}

// Slot of an id (Monolith's fid v2): 15 bits above the low 48.
inline uint32_t slot_of(int64_t id) { return static_cast<uint32_t>((static_cast<uint64_t>(id) >> 48) & 0x7FFF); }

constexpr uint32_t kMinLoadPermille = 250, kMaxLoadPermille = 900;

inline void validate(const TableSpec& spec) {
  if (spec.segments.empty()) throw ValueError("an entry needs at least one segment");
  long long total = 0;
  int widest_one_bit = 0;
  for (const auto& s : spec.segments) {
    if (static_cast<RetrieverKind>(s.retriever) == RetrieverKind::kHashNet) widest_one_bit = std::max(widest_one_bit, s.dim);
    if (s.dim < 1) throw ValueError("segment dim must be >= 1, got " + std::to_string(s.dim));
    if (s.init < 0 || s.init > 3) throw ValueError("unknown initializer kind " + std::to_string(s.init));
    if (s.opt < 0 || s.opt >= kNumOptKinds) throw ValueError("unknown optimizer kind " + std::to_string(s.opt));
    if (s.retriever < 0 || s.retriever > 2) throw ValueError("unknown retriever kind " + std::to_string(s.retriever));
    if (static_cast<OptKind>(s.opt) == OptKind::kBatchSoftmax && s.dim != 1)
      throw ValueError("a batch_softmax segment must have dim 1, got " + std::to_string(s.dim));
    if (static_cast<RetrieverKind>(s.retriever) == RetrieverKind::kFakeQuant && !(s.fake_quant_range > 0))
      throw ValueError("fixed_r8 range must be > 0");
    if (static_cast<RetrieverKind>(s.retriever) == RetrieverKind::kHashNet && s.hashnet_step_size < 1)
      throw ValueError("one_bit step_size must be >= 1");
    if (static_cast<RetrieverKind>(s.retriever) == RetrieverKind::kHashNet && s.dim > 4096)
      throw ValueError("a one_bit segment has at most 4096 dims");
    if (static_cast<InitKind>(s.init) == InitKind::kRandomUniform && !(s.init_a <= s.init_b))
      throw ValueError("random_uniform needs minval <= maxval");
    total += s.dim;
  }
  if (total > (1 << 20)) throw ValueError("entry dim too large: " + std::to_string(total));
  if (spec.value_format < 0 || spec.value_format > 2)
    throw ValueError("unknown value format " + std::to_string(spec.value_format));
  // A step widens the row on the stack, with HashNet's gradient beside it (EmbeddingTable::
  // step_narrow_row): at most 16 KiB.
  if (spec.value_format != 0 && total + widest_one_bit > kMaxNarrowDim)
    throw ValueError("an entry kept in 16 bits a value has at most " + std::to_string(kMaxNarrowDim) +
                     " values, its widest one_bit segment's counted twice; got " + std::to_string(total) +
                     (widest_one_bit ? " + " + std::to_string(widest_one_bit) : std::string()));
  for (const auto& e : spec.slot_expire_days)
    if (e.first > 0x7FFF) throw ValueError("expiry slot " + std::to_string(e.first) + " is not in 0..32767");
  for (const auto& e : spec.slot_occurrence_thresholds)
    if (e.first > 0x7FFF) throw ValueError("threshold slot " + std::to_string(e.first) + " is not in 0..32767");
  if (spec.eviction_policy != 0 && spec.eviction_policy != 1) throw ValueError("eviction_policy must be lru or lfu");
  int n = spec.num_shards;
  if (n < 0 || n > 4096 || (n & (n - 1)) != 0)
    throw ValueError("num_shards must be 0 (automatic) or a power of two in [1, 4096]");
  if (spec.max_load_permille < kMinLoadPermille || spec.max_load_permille > kMaxLoadPermille)
    throw ValueError("max load factor must be in [0.25, 0.9], got " + std::to_string(spec.max_load_permille / 1000.0));
}

// Index bytes one entry takes at most: a quarter of a 64-byte bucket of 4 slots at the
// lowest load the index runs at, half its max load (that of the small indexes, which double;
// large ones stay fuller).
inline uint64_t max_index_bytes_per_entry(uint32_t max_load_permille) {
  return (64 * 2 * 1000 + 4 * max_load_permille - 1) / (4 * max_load_permille);
}

// The growth points of a table's large indexes lie in the last 1/kGrowthSpread below the
// max load: shard s of n at 1 - s / (kGrowthSpread n) of it (Shard::past_growth_point).
// Less than the eighth a reservation leaves to spare, so a reserved table never grows early.
constexpr uint64_t kGrowthSpread = 16;

// Another bound on a shard's index, lower per entry for large shards: an index over 2 MiB
// grows by half, to whole 2 MiB pages, at a load of at least 1 - (n - 1) / (kGrowthSpread n)
// of the max for the shards of a table of n, so it holds at most 1.5 x 64 / 4 / that load
// bytes per entry plus kIndexSlackBytes. (An index of 2 MiB or less is within it too.)
inline uint64_t large_index_bytes_per_entry(uint32_t max_load_permille, uint64_t shards) {
  const uint64_t over = 24 * 1000 * kGrowthSpread * shards;
  const uint64_t under = (kGrowthSpread * shards - (shards - 1)) * max_load_permille;
  return (over + under - 1) / under;
}
constexpr uint64_t kIndexSlackBytes = (uint64_t{2} << 20) + 4096;

// Rows a capacity-limited table of `entries` over `shards` shards may hold besides its
// entries'. A row freed by an eviction is reused by its own shard only, while the new ids
// that take its place land in any shard, so each shard keeps as many rows as it ever held
// entries. A shard holds entries / shards entries give or take sqrt(entries / shards x
// (1 - 1 / shards)); the most one reaches over T full turnovers of the table is about
// sqrt(2 ln T) such deviations above, under 4 for T up to about 3,000.
// (A shard holds at most all the entries: no more than entries x (shards - 1) besides.)
inline uint64_t stranded_rows(uint64_t entries, uint64_t shards) {
  const double spread = std::sqrt(static_cast<double>(entries) * static_cast<double>(shards - 1));
  return std::min(static_cast<uint64_t>(std::ceil(4.0 * spread)), entries * (shards - 1));
}

}  // namespace mtht
