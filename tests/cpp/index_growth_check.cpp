// Checks when a shard's index grows, printing one line per failure and "ok" when there is
// none. A shard alone, ids inserted one at a time: while its index is a pooled piece (2 MiB
// or less) it doubles once its entries pass the load bound, whatever the shard's phase (s / n
// for shard s of n); once mapped, it grows by at least half once they pass its growth
// point, 1 - phase / 16 of the bound, and not before. A table of 4 shards, each batch adding
// 512 new ids to every shard: the shards' mapped indexes grow in different batches, so the
// table's index grows by one shard's growth at a time.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mtht/hash.h"
#include "mtht/table.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, unsigned long long got, unsigned long long wanted) {
  if (ok) return;
  if (++failures < 20) std::printf("FAILED: %s: %llu, expected %llu\n", what, got, wanted);
}

constexpr uint32_t kBoundPermille = 500;
constexpr uint64_t kPooledMost = uint64_t{2} << 20;  // the largest pooled index, in bytes

// Whether `entries` pass `ppm` millionths of `slots`.
bool past(uint64_t entries, uint64_t slots, uint64_t ppm) { return entries * 1000000 > slots * ppm; }

// The load in millionths at which a mapped index of a shard at `phase_ppm` grows.
uint64_t growth_ppm(uint64_t phase_ppm) {
  const uint64_t bound_ppm = uint64_t{kBoundPermille} * 1000;
  return bound_ppm - bound_ppm * phase_ppm / 16000000;
}

void check_one_shard(uint32_t phase_ppm) {
  mtht::detail::Shard sh(16, false, kBoundPermille, phase_ppm);
  int mapped_growths = 0;
  for (int64_t id = 0; mapped_growths < 3 && id < 2000000; ++id) {
    const uint64_t slots = sh.slots(), bytes = sh.index_bytes();
    bool inserted = false;
    sh.find_or_insert(id, mtht::hash_id(id), &inserted);
    sh.grow_if_due();
    expect(inserted, "a new id inserted", inserted, true);
    if (slots == 0) continue;  // the first index
    const bool grew = sh.slots() != slots;
    if (bytes <= kPooledMost) {
      const bool due = past(sh.size(), slots, uint64_t{kBoundPermille} * 1000);
      expect(grew == due, "a pooled index grows at the bound", grew, due);
      if (grew && sh.index_bytes() <= kPooledMost)
        expect(sh.slots() == 2 * slots, "a pooled index doubles", sh.slots(), 2 * slots);
    } else {
      const bool due = past(sh.size(), slots, growth_ppm(phase_ppm));
      expect(grew == due, "a mapped index grows at its growth point", grew, due);
      if (grew) {
        expect(2 * sh.slots() >= 3 * slots, "a mapped index grows by half or more", sh.slots(), 3 * slots / 2);
        ++mapped_growths;
      }
    }
    if (failures >= 20) return;
  }
  expect(mapped_growths == 3, "mapped growths in 2,000,000 ids", static_cast<unsigned long long>(mapped_growths), 3);
}

void check_table_of_four_shards() {
  constexpr size_t kShards = 4;
  constexpr int64_t kPerShard = 512;  // new ids of each shard in each batch
  mtht::TableSpec spec;
  mtht::SegmentSpec seg;
  seg.dim = 1;
  seg.opt = static_cast<int>(mtht::OptKind::kSgd);
  spec.segments.push_back(seg);
  spec.num_shards = kShards;
  spec.max_load_permille = kBoundPermille;
  mtht::EmbeddingTable table(spec);
  // Ids by the shard their hash picks (its top 2 bits), enough for 300 batches.
  constexpr size_t kBatches = 300;
  std::vector<std::vector<int64_t>> by_shard(kShards);
  auto short_of_ids = [&] {
    for (const auto& ids : by_shard)
      if (ids.size() < kBatches * kPerShard) return true;
    return false;
  };
  for (int64_t id = 0; short_of_ids(); ++id) by_shard[mtht::hash_id(id) >> 62].push_back(id);
  // Each shard, once its index is mapped, at 4 MiB (half again the largest pooled piece,
  // rounded up to whole 2 MiB pages), grows again once its entries pass 1 - s / 64 of the
  // bound, to 6 MiB.
  constexpr uint64_t kFirstMapped = 2 * kPooledMost, kSecondMapped = 3 * kPooledMost;
  const uint64_t mapped_slots = kFirstMapped / 64 * 4;
  std::vector<size_t> due(kShards);
  for (size_t s = 0; s < kShards; ++s) {
    const uint64_t ppm = growth_ppm(s * 1000000 / kShards);
    size_t batch = 1;
    while (!past(batch * kPerShard, mapped_slots, ppm)) ++batch;
    due[s] = batch;
  }
  const std::vector<float> values(kShards * kPerShard, 1.0f);
  std::vector<int64_t> ids;
  uint64_t before = 0;
  size_t grown = 0;
  for (size_t batch = 1; batch <= kBatches; ++batch) {
    ids.clear();
    for (size_t s = 0; s < kShards; ++s)
      ids.insert(ids.end(), by_shard[s].begin() + (batch - 1) * kPerShard, by_shard[s].begin() + batch * kPerShard);
    table.assign(ids.data(), ids.size(), values.data(), 5);
    const uint64_t after = table.stats().index_bytes;
    if (before == kShards * kFirstMapped || grown > 0) {
      // From four mapped indexes of 4 MiB: the shards due at this batch grow, each in a
      // batch of its own.
      size_t growing = 0;
      for (size_t s = 0; s < kShards; ++s) growing += due[s] == batch;
      const uint64_t wanted = before + growing * (kSecondMapped - kFirstMapped);
      expect(after == wanted, "the table's index after a batch", after, wanted);
      grown += growing;
    }
    before = after;
  }
  expect(grown == kShards, "shards grown one batch after another", grown, kShards);
  expect(table.size() == kBatches * kShards * kPerShard, "entries", table.size(), kBatches * kShards * kPerShard);
}

}  // namespace

int main() {
  check_one_shard(0);        // shard 0 of any table: at the bound
  check_one_shard(750000);   // shard 3 of 4
  check_one_shard(999999);   // the last phase, just short of 1 - 1/16 of the bound
  check_table_of_four_shards();
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
