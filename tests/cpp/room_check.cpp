// Checks that the room a write reserves before it changes anything stays its own until the
// write is done, printing one line per failure and "ok" when there is none. Two writes are
// interleaved by hand, as two threads may interleave them: A reserves room for its new ids
// (reserve_ids, as a multi-table update does) up to the slack above the index's load bound,
// then B writes a new id into the same shard, then A writes. B must find A's room taken and
// grow the index before it changes anything; A's write must then insert without growing the
// index (an allocation half-way through a write could fail and leave it half applied). A
// write whose new ids take the index past its bound but within the slack grows it after it
// is done. The room is given back when the write is done or dropped: the index then grows
// exactly when the entries alone exceed its load bound.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mtht/table.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s\n", what);
}

mtht::TableSpec one_shard_sgd() {
  mtht::TableSpec spec;
  mtht::SegmentSpec seg;
  seg.dim = 4;
  seg.opt = static_cast<int>(mtht::OptKind::kSgd);
  spec.segments.push_back(seg);
  spec.num_shards = 1;
  return spec;
}

// Entries the table holds before its index must grow.
uint64_t bound(const mtht::EmbeddingTable& t) { return t.stats().capacity * one_shard_sgd().max_load_permille / 1000; }
// Entries a write may take the index to before it grows, to grow after the write instead:
// the bound and a quarter of the rest of the slots.
uint64_t slack(const mtht::EmbeddingTable& t) {
  return t.stats().capacity * (3 * one_shard_sgd().max_load_permille + 1000) / 4000;
}

std::vector<int64_t> range(int64_t first, uint64_t n) {
  std::vector<int64_t> ids(n);
  for (uint64_t i = 0; i < n; ++i) ids[i] = first + static_cast<int64_t>(i);
  return ids;
}

void assign(mtht::EmbeddingTable& t, const std::vector<int64_t>& ids, float value) {
  const std::vector<float> rows(ids.size() * 4, value);
  t.assign(ids.data(), ids.size(), rows.data(), 0);
}

bool values_are(mtht::EmbeddingTable& t, const std::vector<int64_t>& ids, float value) {
  std::vector<float> out(ids.size() * 4);
  t.lookup(ids.data(), ids.size(), out.data());
  for (float v : out)
    if (v != value) return false;
  return true;
}

// Inserts new ids one at a time from `next` until the index grows; returns the size it grew at.
uint64_t size_at_growth(mtht::EmbeddingTable& t, int64_t next) {
  const uint64_t capacity = t.stats().capacity;
  while (t.stats().capacity == capacity) assign(t, {next++}, 1.f);
  return t.stats().size;
}

// `dedup`: A is a deduplicated write. Planned for one thread, a plain write or a
// deduplicated one under 4,096 ids is planned as counts by shard alone (and the latter
// grouped in input order); a larger deduplicated one in shard order, with its ids.
// `stored`: the entries the table holds first (the more, the more new ids A can take).
void check_interleaved_writes(bool dedup, int64_t stored) {
  mtht::EmbeddingTable t(one_shard_sgd());
  assign(t, range(0, stored), 1.f);
  const uint64_t room = slack(t) - t.stats().size;  // new entries that fit before growth
  const std::vector<int64_t> a = range(1'000'000, room);
  const std::vector<int64_t> b = range(2'000'000, 1);
  {
    const std::vector<float> grads(a.size() * 4, 1.f);
    auto grad_row = [&](size_t i) { return grads.data() + 4 * i; };
    auto planned = t.reserve_ids(a.data(), a.size(), {}, false, /*one_thread=*/true, /*runs=*/dedup);
    expect(planned.plan.ordered() == (dedup && a.size() >= 4096),
           "A's plan holds its ids in shard order only when deduplicated and large");
    if (dedup) t.group_runs(planned, a.data(), nullptr, grad_row);
    const uint64_t before = t.stats().capacity;
    assign(t, b, 2.f);  // B: room only beside A's
    const uint64_t capacity = t.stats().capacity;
    expect(capacity > before, "B's write grew the index (A's room is taken)");
    const float lr = 0.5f;
    t.apply_gradient_rows(a.data(), a.size(), grad_row, &lr, 0, 7, dedup, nullptr, false, &planned);
    expect(t.stats().capacity == capacity, "A's write grew the index (its room was taken)");
    expect(values_are(t, a, -0.5f), "A's entries hold one SGD step from zero");
    expect(values_are(t, b, 2.f), "B's entry holds its row");
    expect(values_are(t, range(0, stored), 1.f), "the first entries are unchanged");
  }
  // Both writes are done: nothing is held, so the index grows just past its bound.
  const uint64_t limit = bound(t);
  expect(size_at_growth(t, 3'000'000) == limit + 1, "room held after the writes were done");
}

void check_growth_after_a_write() {
  mtht::EmbeddingTable t(one_shard_sgd());
  assign(t, range(0, 1000), 1.f);
  const uint64_t capacity = t.stats().capacity, limit = bound(t);
  // Stored ids and new ones, whose share would take the index past its bound, but not past
  // the slack: the index keeps its size, the new ids being too few to pass the bound.
  std::vector<int64_t> ids = range(0, std::min<uint64_t>(1000, slack(t) - limit));
  const std::vector<int64_t> fresh = range(1'000'000, limit - 1000 - 1);
  ids.insert(ids.end(), fresh.begin(), fresh.end());
  assign(t, ids, 3.f);
  expect(t.stats().size == limit - 1 && t.stats().capacity == capacity, "a write within the bound grew the index");
  // New ids past the bound, within the slack: the write goes through, then the index grows.
  const std::vector<int64_t> more = range(2'000'000, slack(t) - limit);
  assign(t, more, 4.f);
  expect(t.stats().capacity > capacity, "the index did not grow after the write that took it past its bound");
  expect(t.stats().size * 1000 <= t.stats().capacity * one_shard_sgd().max_load_permille,
         "the load is past its bound after the write");
  expect(values_are(t, ids, 3.f) && values_are(t, more, 4.f), "the entries hold their rows");
}

void check_dropped_reservation() {
  mtht::EmbeddingTable t(one_shard_sgd());
  assign(t, range(0, 1000), 1.f);
  const std::vector<int64_t> a = range(1'000'000, 500);
  { const auto planned = t.reserve_ids(a.data(), a.size()); }  // a write that failed before it wrote
  const uint64_t limit = bound(t);
  expect(size_at_growth(t, 3'000'000) == limit + 1, "room held after a reservation was dropped");
}

}  // namespace

int main() {
  for (const int64_t stored : {1000, 10000}) {
    check_interleaved_writes(false, stored);
    check_interleaved_writes(true, stored);
  }
  check_growth_after_a_write();
  check_dropped_reservation();
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
