// Checks that a write whose new ids would take a shard past the entries it may hold is
// refused before any entry changes, printing one line per failure and "ok" when there is
// none. The limit is lowered to 1000 entries here (it is 2^28 - 2, out of reach of a quick
// check). Each write goes to a one-shard table holding 990 entries: 20 new ids are a
// ValueError for every kind of write (assign, assign_add, apply_gradients with and without
// dedup, on one thread and on two; a write to two tables and the fused update, which leave
// the other table unwritten too; a checkpoint's load); 10 new ids fill the shard; so do
// 10 new ids each given twice, and a batch of 990 stored ids beside them. A full shard
// takes writes of its stored ids, from two threads at once too. With an admission filter,
// every absent id counts, admitted or not.
#define MTHT_MAX_ROWS_PER_SHARD 1000

#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "mtht/errors.h"
#include "mtht/fused.h"
#include "mtht/multi_table.h"
#include "mtht/table.h"
#include "mtht/thread_pool.h"

namespace {

constexpr int64_t kStored = 990;

int failures = 0;

void expect(bool ok, const char* what, const char* write) {
  if (ok) return;
  ++failures;
  std::printf("FAILED (%s): %s\n", write, what);
}

std::unique_ptr<mtht::EmbeddingTable> filled_table(uint32_t threshold = 0) {
  mtht::TableSpec spec;
  mtht::SegmentSpec seg;
  seg.dim = 1;
  seg.opt = static_cast<int>(mtht::OptKind::kSgd);
  spec.segments.push_back(seg);
  spec.num_shards = 1;
  spec.has_filter = threshold > 0;
  spec.default_occurrence_threshold = threshold;
  auto t = std::make_unique<mtht::EmbeddingTable>(spec);
  std::vector<int64_t> ids(kStored);
  for (int64_t i = 0; i < kStored; ++i) ids[i] = i;
  const std::vector<float> ones(kStored, 1.0f);
  for (uint32_t k = 0; k <= threshold; ++k) t->assign(ids.data(), ids.size(), ones.data(), 5);  // admitted at last
  return t;
}

std::vector<int64_t> new_ids(int64_t count, int times = 1) {
  std::vector<int64_t> ids;
  for (int r = 0; r < times; ++r)
    for (int64_t i = 0; i < count; ++i) ids.push_back(kStored + i);
  return ids;
}

// Whether `t` holds ids [0, kStored) with value 1 and nothing else.
bool unchanged(const mtht::EmbeddingTable& t) {
  if (t.size() != kStored) return false;
  std::vector<int64_t> ids(kStored + 20);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
  std::vector<uint8_t> found(ids.size());
  t.contains(ids.data(), ids.size(), found.data());
  std::vector<float> values(ids.size());
  t.lookup(ids.data(), ids.size(), values.data());
  for (size_t i = 0; i < ids.size(); ++i)
    if (found[i] != (i < static_cast<size_t>(kStored)) || values[i] != (i < static_cast<size_t>(kStored) ? 1.0f : 0.0f))
      return false;
  return true;
}

using Write = std::function<void(mtht::EmbeddingTable&, mtht::EmbeddingTable&, const std::vector<int64_t>&)>;

// The writes, each of `ids` into the first table (and of one new id into the second, where
// the write takes two tables).
std::vector<std::pair<const char*, Write>> writes() {
  const float lr = 0.5f;
  auto rows = [](const std::vector<int64_t>& ids) { return std::vector<float>(ids.size(), 1.0f); };
  return {
      {"assign", [=](auto& t, auto&, const auto& ids) { t.assign(ids.data(), ids.size(), rows(ids).data(), 6); }},
      {"assign_add",
       [=](auto& t, auto&, const auto& ids) { t.assign_add(ids.data(), ids.size(), rows(ids).data(), 6); }},
      {"apply_gradients",
       [=](auto& t, auto&, const auto& ids) {
         t.apply_gradients(ids.data(), ids.size(), rows(ids).data(), &lr, 1, 1, 6, false);
       }},
      {"apply_gradients with dedup",
       [=](auto& t, auto&, const auto& ids) {
         t.apply_gradients(ids.data(), ids.size(), rows(ids).data(), &lr, 1, 1, 6, true);
       }},
      {"write_tables",
       [=](auto& t, auto& other, const auto& ids) {
         static const int64_t other_id = 7;
         static const float two = 2.0f;
         const std::vector<float> values = rows(ids);
         std::vector<mtht::TablePart> parts(2);
         parts[0] = {&other, mtht::WriteKind::kAssign, &other_id, 1, &two, nullptr, 0};
         parts[1] = {&t, mtht::WriteKind::kApplyGradients, ids.data(), ids.size(), values.data(), &lr, 1};
         mtht::write_tables(parts, 1, 6, false);
       }},
      {"fused_apply_gradients",
       [=](auto& t, auto& other, const auto& ids) {
         std::vector<int64_t> fused = {7};
         fused.insert(fused.end(), ids.begin(), ids.end());
         const std::vector<int32_t> sizes = {1, static_cast<int32_t>(ids.size())};
         const mtht::FusedLayout layout = mtht::fused_layout({1, 1}, sizes.data(), sizes.size(), 1, fused.size());
         const std::vector<float> grads(fused.size(), 1.0f);
         const float lrs[2] = {lr, lr};
         mtht::fused_apply_gradients({&other, &t}, layout, fused.data(), grads.data(), grads.size(), lrs, 2, 1, 6,
                                     {0, 0});
       }},
      {"load_entries",
       [=](auto& t, auto&, const auto& ids) {
         const std::vector<int64_t> ts(ids.size(), 6);
         const std::vector<float> data(ids.size(), 1.0f);  // an SGD entry: its one value
         t.load_entries(ids.data(), ts.data(), data.data(), ids.size());
       }},
  };
}

void check_writes(int threads) {
  mtht::ThreadPool::global().set_num_threads(threads);
  for (const auto& [name, write] : writes()) {
    {  // 20 new ids: refused, neither table changed
      auto t = filled_table();
      auto other = filled_table();
      bool refused = false;
      try {
        write(*t, *other, new_ids(20));
      } catch (const mtht::ValueError&) {
        refused = true;
      } catch (const std::exception& e) {
        std::printf("(%s) threw: %s\n", name, e.what());
      }
      expect(refused, "20 new ids past the shard's limit are a ValueError", name);
      expect(unchanged(*t), "the refused write changed nothing", name);
      expect(unchanged(*other), "the refused write changed no other table", name);
      // The table takes writes as before.
      write(*t, *other, new_ids(10));
      expect(t->size() == 1000, "10 new ids fill the shard after a refused write", name);
    }
    {  // Each new id given twice, beside every id stored: they fit.
      auto t = filled_table();
      auto other = filled_table();
      std::vector<int64_t> ids = new_ids(10, 2);
      for (int64_t i = 0; i < kStored; ++i) ids.push_back(i);
      write(*t, *other, ids);
      expect(t->size() == 1000, "10 new ids given twice, beside the stored ones, fill the shard", name);
    }
  }
}

// A full shard takes writes of the ids it holds, from two threads at once.
void check_full_shard() {
  auto t = filled_table();
  const std::vector<int64_t> ten = new_ids(10);
  const std::vector<float> ones(kStored, 1.0f);
  t->assign(ten.data(), ten.size(), ones.data(), 6);
  std::vector<int64_t> stored(kStored);
  for (int64_t i = 0; i < kStored; ++i) stored[i] = i;
  int refused = 0;
  auto write_stored = [&] {
    const float lr = 0.5f;
    for (int k = 0; k < 200; ++k) {
      try {
        t->apply_gradients(stored.data() + k % 2, 10, ones.data(), &lr, 1, 1, 6, k % 3 == 0);
      } catch (const std::exception&) {
        ++refused;
      }
    }
  };
  std::thread other(write_stored);
  write_stored();
  other.join();
  expect(refused == 0 && t->size() == 1000, "a full shard takes writes of the ids it holds", "two threads");
}

// With an admission filter (an id admitted once 5 occurrences were seen before), every
// absent id counts, admitted or not: an earlier part of the same call, or a write on another
// thread, may raise its count before this write admits it. So a shard one entry short of
// the limit refuses a write of one id twice then once in one call (counts 0 -> 2, admitted
// at its third occurrence with a threshold of 2), which it would otherwise half apply.
void check_filter() {
  const float lr = 0.5f;
  auto write = [&](mtht::EmbeddingTable& t, const std::vector<int64_t>& ids) {
    const std::vector<float> grads(ids.size(), 1.0f);
    t.apply_gradients(ids.data(), ids.size(), grads.data(), &lr, 1, 1, 6, false);
  };
  auto t = filled_table(5);
  write(*t, new_ids(10, 1));  // 10 absent ids fit, admitted or not
  expect(t->size() == kStored, "ids the filter keeps out take no entry", "filter");
  bool refused = false;
  try {
    write(*t, new_ids(20, 1));
  } catch (const mtht::ValueError&) {
    refused = true;
  }
  expect(refused && t->size() == kStored, "20 absent ids past the limit are a ValueError", "filter");

  auto two = filled_table(2);
  const std::vector<int64_t> nine = new_ids(9);
  const std::vector<float> ones(kStored, 1.0f);
  for (int k = 0; k < 3; ++k) two->assign(nine.data(), nine.size(), ones.data(), 5);  // admitted at the 3rd
  const int64_t before_ts = two->max_update_ts();
  const int64_t id = 5000;
  const int64_t twice[2] = {id, id};
  std::vector<mtht::TablePart> parts(2);
  parts[0] = {two.get(), mtht::WriteKind::kAssign, twice, 2, ones.data(), nullptr, 0};
  parts[1] = {two.get(), mtht::WriteKind::kAssign, &id, 1, ones.data(), nullptr, 0};
  refused = false;
  try {
    mtht::write_tables(parts, 0, 7, false);
  } catch (const mtht::ValueError&) {
    refused = true;
  } catch (const std::exception& e) {
    std::printf("(filter, two parts) threw: %s\n", e.what());
  }
  expect(refused && two->size() == 999 && two->max_update_ts() == before_ts,
         "a call whose parts admit an id past the limit is refused whole", "filter, two parts");
}

}  // namespace

int main() {
  for (int threads : {1, 2}) check_writes(threads);
  check_full_shard();
  check_filter();
  if (failures) return 1;
  std::printf("ok\n");
  return 0;
}
