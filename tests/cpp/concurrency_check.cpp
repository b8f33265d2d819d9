// Stresses an EmbeddingTable from several threads at once, for ThreadSanitizer (and ASan/UBSan)
// to find data races and crashes in the concurrent paths, printing one line per failure and
// "ok" when there is none. Four caller threads, the global pool at three threads (batches of
// 4096 ids or more spread over its helpers, smaller ones stay on their caller), each looping
// over overlapping ids:
//   * table A: automatic shard count (starts with one shard and splits while the others read
//     and write), Adagrad. Batched lookups, contains, assign, apply_gradients with and without
//     dedup, reinitialize, lookup_entries, stats/size/stored_ids, evict by expiry (the ids of
//     slot 1 expire after a day), and checkpoint saves (with and without hold_writes).
//     Every thread also assign_adds +1 to each dim of "counter" ids (overlapping between
//     threads, repeated within a batch), which nothing else writes: at the end each
//     counter's every dim must equal the number of adds made to it (concurrent assign_adds
//     lose nothing), a lookup must never see a row half written (all dims of a counter equal)
//     and a counter once added must stay in the table. A final save, loaded into a new
//     table, must hold the same counters.
//     Slot 2 ids go through an admission filter; some writes stamp timestamps past 2106
//     (kept apart from the slots); one thread loads checkpoint entries (load_entries) into
//     the live table, another changes the pool's thread count between calls.
//   * write_tables / lookup_tables over A (counter adds, counted as above), B and D at once,
//     and fused_apply_gradients / fused_lookup over A and B.
//   * table D: values in bfloat16, an Adam segment and a one_bit (HashNet) one, automatic shards;
//     one thread saves it and loads the checkpoint back into it while the others use it.
//   * table B: a capacity limit (max_entries, LRU, automatic shards), and table C: a capacity
//     limit with LFU, an admission filter and 4 fixed shards, so that evictions run
//     concurrently with the writes and reads of the other threads; neither may ever be seen
//     past its limit.
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mtht/checkpoint.h"
#include "mtht/errors.h"
#include "mtht/fused.h"
#include "mtht/multi_table.h"
#include "mtht/table.h"
#include "mtht/thread_pool.h"

namespace {

constexpr int kThreads = 4;
constexpr int kIterations = 80;
constexpr int kDim = 4;
constexpr int64_t kCounters = 24000;               // counter ids: kCounterBase + [0, kCounters)
constexpr int64_t kCounterBase = 1000000;
constexpr int64_t kGradIds = 120000;               // gradient ids (slot 0): kGradBase + [0, kGradIds)
constexpr int64_t kGradBase = 5000000;
constexpr int64_t kExpiringIds = 20000;            // slot 1 ids, expire after a day: (1 << 48) | [0, kExpiringIds)
constexpr int64_t kSlot1 = int64_t{1} << 48;
constexpr int64_t kSlot2 = int64_t{2} << 48;        // filtered in A: kSlot2 | [0, 20000)
constexpr int64_t kFarTs = int64_t{5} << 30;       // past 2106: a slot keeps it apart
constexpr int64_t kBaseTs = 1700000000;
constexpr uint64_t kMaxB = 12000, kMaxC = 6000;
constexpr int64_t kCapacityIds = 30000;            // ids written to B and C: [0, kCapacityIds)
constexpr int64_t kAbsentBase = 90000000;          // never written: kAbsentBase + [0, 1000)
bool absent(int64_t id) { return id >= kAbsentBase && id < kAbsentBase + 1000; }

std::mutex print_mu;
std::atomic<int> failures{0};

void fail(const std::string& what) {
  std::lock_guard<std::mutex> lk(print_mu);
  if (failures.fetch_add(1) < 50) std::printf("FAILED: %s\n", what.c_str());
}

struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

mtht::SegmentSpec segment(mtht::OptKind opt) {
  mtht::SegmentSpec seg;
  seg.dim = kDim;
  seg.init = static_cast<int>(mtht::InitKind::kZeros);
  seg.opt = static_cast<int>(opt);
  return seg;
}

mtht::TableSpec spec_a() {
  mtht::TableSpec spec;
  spec.segments.push_back(segment(mtht::OptKind::kAdagrad));
  spec.random_seed = 3;
  spec.num_shards = 0;  // automatic: starts with one shard, splits as it grows
  spec.slot_expire_days = {{1, 1}};
  // An admission filter for slot 2 alone (seen twice before it is admitted); counters, in
  // slot 0, are admitted at once.
  spec.has_filter = true;
  spec.default_occurrence_threshold = 0;
  spec.slot_occurrence_thresholds = {{2, 2}};
  return spec;
}

// A capacity-limited table: `shards` 0 for the automatic count; `policy` 0 LRU, 1 LFU;
// `filtered`: an admission filter (ids admitted at their second occurrence).
mtht::TableSpec capped_spec(mtht::OptKind opt, int shards, uint64_t max_entries, int policy, bool filtered) {
  mtht::TableSpec spec;
  spec.segments.push_back(segment(opt));
  spec.num_shards = shards;
  spec.max_entries = max_entries;
  spec.eviction_policy = policy;
  spec.has_filter = filtered;
  spec.default_occurrence_threshold = filtered ? 1 : 0;
  return spec;
}

// 16 bits a value, two segments, one of them one_bit (HashNet: table-wide scales that steps
// move), automatic shards.
mtht::TableSpec spec_d() {
  mtht::TableSpec spec;
  spec.segments.push_back(segment(mtht::OptKind::kAdam));
  mtht::SegmentSpec hashnet = segment(mtht::OptKind::kSgd);
  hashnet.retriever = static_cast<int>(mtht::RetrieverKind::kHashNet);
  hashnet.hashnet_step_size = 3;
  hashnet.init = static_cast<int>(mtht::InitKind::kRandomUniform);
  hashnet.init_a = -0.1f;
  hashnet.init_b = 0.1f;
  spec.segments.push_back(hashnet);
  spec.value_format = static_cast<int>(mtht::ValueFormat::kBFloat16);
  spec.num_shards = 0;
  return spec;
}

std::string temp_dir;

// The files of a checkpoint of `files` parts named `name` in temp_dir, and their removal.
std::vector<std::string> checkpoint_paths(const std::string& name, int files) {
  std::vector<std::string> paths;
  for (int i = 0; i < files; ++i) paths.push_back(temp_dir + "/" + name + "_" + std::to_string(i));
  return paths;
}
void remove_files(const std::vector<std::string>& paths) {
  for (const auto& p : paths) ::unlink(p.c_str());
}

struct Shared {
  mtht::EmbeddingTable a{spec_a()};
  mtht::EmbeddingTable b{capped_spec(mtht::OptKind::kAdagrad, 0, kMaxB, 0, false)};
  mtht::EmbeddingTable c{capped_spec(mtht::OptKind::kSgd, 4, kMaxC, 1, true)};
  mtht::EmbeddingTable d{spec_d()};
  std::vector<std::vector<uint32_t>> added = std::vector<std::vector<uint32_t>>(kThreads, std::vector<uint32_t>(kCounters));
  std::atomic<int> capacity_refusals{0};
  std::atomic<int> saves{0};
};

// Checks the counter rows among `ids` read into `out`: every dim equal, a whole number.
void check_counter_rows(const std::vector<int64_t>& ids, const std::vector<float>& out, const char* what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < kCounterBase || ids[i] >= kCounterBase + kCounters) continue;
    const float* row = out.data() + i * kDim;
    for (int j = 0; j < kDim; ++j)
      if (row[j] != row[0] || row[j] != std::floor(row[j]) || row[j] < 0) {
        fail(std::string(what) + ": counter " + std::to_string(ids[i]) + " read half written or not whole: dim " +
             std::to_string(j) + " = " + std::to_string(row[j]) + ", dim 0 = " + std::to_string(row[0]));
        return;
      }
  }
}

void worker(Shared& sh, int t) {
  Rng rng{static_cast<uint64_t>(t) * 7919 + 11};
  std::vector<uint32_t>& added = sh.added[t];
  const float lr = 0.01f;
  for (int it = 0; it < kIterations; ++it) {
    const bool large = (it + t) % 3 == 0;  // >= 4096: over the pool's helpers, and asks for a split
    const int64_t ts = kBaseTs + it;
    // 1. assign_add +1 to counter ids (repeats in the batch accumulate).
    {
      const size_t n = it % 25 == 24 ? 20000 : large ? 5000 : 300;
      std::vector<int64_t> ids(n);
      for (auto& id : ids) {
        // Overlapping ranges: thread t favours its quarter but reaches all of them.
        const int64_t k = rng.below(4) == 0 ? rng.below(kCounters) : (t * kCounters / kThreads + rng.below(kCounters / 2)) % kCounters;
        id = kCounterBase + k;
        ++added[k];
      }
      const std::vector<float> ones(n * kDim, 1.0f);
      sh.a.assign_add(ids.data(), n, ones.data(), ts);
    }
    // 2. Lookups of counters, gradient ids, expiring ids and absent ids.
    {
      const size_t n = (it + t) % 2 ? 6000 : 250;
      std::vector<int64_t> ids(n);
      for (size_t i = 0; i < n; ++i) {
        switch (rng.below(4)) {
          case 0: ids[i] = kCounterBase + rng.below(kCounters); break;
          case 1: ids[i] = kGradBase + rng.below(kGradIds); break;
          case 2: ids[i] = kSlot1 | rng.below(kExpiringIds); break;
          default: ids[i] = kAbsentBase + rng.below(1000); break;  // never written
        }
      }
      std::vector<float> out(n * kDim);
      sh.a.lookup(ids.data(), n, out.data());
      check_counter_rows(ids, out, "lookup");
      for (size_t i = 0; i < n; ++i)
        if (absent(ids[i]) && out[i * kDim] != 0.0f) fail("lookup of an absent id is not zero");
      std::vector<uint8_t> found(n);
      sh.a.contains(ids.data(), n, found.data());
      for (size_t i = 0; i < n; ++i) {
        if (absent(ids[i]) && found[i]) fail("contains finds an id never written");
        if (ids[i] >= kCounterBase && ids[i] < kCounterBase + kCounters && added[ids[i] - kCounterBase] && !found[i])
          fail("a counter this thread added is not in the table: " + std::to_string(ids[i]));
      }
    }
    // 3. apply_gradients, with and without dedup, over gradient and expiring ids.
    {
      const size_t n = large ? 4500 : 400;
      std::vector<int64_t> ids(n);
      for (auto& id : ids)
        switch (rng.below(6)) {
          case 0: case 1: id = kSlot1 | rng.below(kExpiringIds); break;
          case 2: id = kSlot2 | rng.below(20000); break;
          default: id = kGradBase + (t * 5000 + rng.below(kGradIds / 2)) % kGradIds; break;
        }
      std::vector<float> grads(n * kDim);
      for (auto& g : grads) g = static_cast<float>(rng.below(200) - 100) / 100.0f;
      // Now and then a timestamp the slots keep apart (far_ts_).
      sh.a.apply_gradients(ids.data(), n, grads.data(), &lr, 1, it, it % 7 == 5 ? kFarTs + it : ts, (it + t) % 2 == 0);
    }
    // 4. assign on gradient ids; reinitialize some; lookup_entries.
    {
      const size_t n = 200;
      std::vector<int64_t> ids(n);
      for (auto& id : ids) id = kGradBase + rng.below(kGradIds);
      std::vector<float> v(n * kDim, 0.5f);
      sh.a.assign(ids.data(), n, v.data(), ts);
      std::vector<int32_t> status(16);
      sh.a.reinitialize(ids.data(), 16, ts, status.data());
      std::vector<float> values(n * kDim), state(n * kDim);
      std::vector<int64_t> tss(n);
      std::vector<uint8_t> found(n);
      sh.a.lookup_entries(ids.data(), n, values.data(), state.data(), tss.data(), found.data());
    }
    // 5. Expiry: every slot 1 id was written at most kIterations seconds after kBaseTs.
    if ((it + t) % 4 == 1) sh.a.evict(kBaseTs + 2 * 86400);
    // 6. A save (thread 0), alternately with the writes held off as the Python layer does.
    if (t == 0 && it % 6 == 3) {
      const int k = sh.saves.fetch_add(1);
      const std::vector<std::string> paths = checkpoint_paths("a_" + std::to_string(k), 2);
      if (k % 2) sh.a.hold_writes();
      try {
        mtht::save_checkpoint(sh.a, paths, sh.a.max_update_ts(), it % 4 == 3, "concurrency_check");
      } catch (const std::exception& e) {
        fail(std::string("save: ") + e.what());
      }
      if (k % 2) sh.a.release_writes();
      remove_files(paths);
    }
    // 7. Stored ids and stats (thread 1).
    if (t == 1 && it % 5 == 2) {
      const uint64_t size = sh.a.size();
      std::vector<int64_t> stored(size + 100000);
      const size_t got = sh.a.stored_ids(stored.data(), stored.size());
      if (got > stored.size()) fail("stored_ids: more than room was given for");
      (void)sh.a.stats(it % 2 == 0);
      (void)sh.b.stats(true);
      (void)sh.a.num_shards();
    }
    // 8. The pool's thread count changed while other threads' calls run (it waits for the
    // call that has the helpers); a checkpoint's entries loaded into the live table.
    if (t == 2 && it % 10 == 4) mtht::ThreadPool::global().set_num_threads(it % 20 == 4 ? 2 : 3);
    if (t == 3 && it % 7 == 3) {
      const size_t n = it % 2 ? 5000 : 500;
      std::vector<int64_t> ids(n), tss(n, ts);
      for (auto& id : ids) id = kGradBase + rng.below(kGradIds);
      std::vector<float> data(n * 2 * kDim, 0.25f);  // values then Adagrad's state
      sh.a.load_entries(ids.data(), tss.data(), data.data(), n);
    }
    // A checkpoint of D loaded back into D (thread 3) while the others write and read it:
    // its files decoded and inserted over the pool's threads.
    if (t == 3 && it % 9 == 5) {
      const std::vector<std::string> paths = checkpoint_paths("d_" + std::to_string(it), 2);
      try {
        mtht::save_checkpoint(sh.d, paths, sh.d.max_update_ts(), false, "concurrency_check_d");
        mtht::load_checkpoint(sh.d, paths, "concurrency_check_d");
      } catch (const std::exception& e) {
        fail(std::string("save and load of D: ") + e.what());
      }
      remove_files(paths);
    }
    // 9. A write to several tables at once (counters of A among them) and a read of several.
    {
      const size_t n = large ? 4100 : 150;
      std::vector<int64_t> counter_ids(n), cap_ids(n), d_ids(n);
      for (size_t i = 0; i < n; ++i) {
        const int64_t k = rng.below(kCounters);
        counter_ids[i] = kCounterBase + k;
        cap_ids[i] = rng.below(kCapacityIds);
        d_ids[i] = rng.below(50000);
      }
      const std::vector<float> ones(n * kDim, 1.0f);
      std::vector<float> grads(n * 2 * kDim);
      for (auto& g : grads) g = static_cast<float>(rng.below(200) - 100) / 100.0f;
      const float lrs[2] = {0.01f, 0.01f};
      std::vector<mtht::TablePart> parts(3);
      parts[0] = {&sh.a, mtht::WriteKind::kAssignAdd, counter_ids.data(), n, ones.data(), nullptr, 0};
      parts[1] = {&sh.b, mtht::WriteKind::kApplyGradients, cap_ids.data(), n, grads.data(), lrs, 1};
      parts[2] = {&sh.d, mtht::WriteKind::kApplyGradients, d_ids.data(), n, grads.data(), lrs, 2};
      try {
        mtht::write_tables(parts, it, ts, (it + t) % 2 == 1);
        for (size_t i = 0; i < n; ++i) ++added[counter_ids[i] - kCounterBase];
      } catch (const mtht::ValueError& e) {
        fail(std::string("write_tables refused: ") + e.what());
      }
      std::vector<float> out_a(n * kDim), out_b(n * kDim), out_d(n * 2 * kDim);
      mtht::lookup_tables({{&sh.a, counter_ids.data(), n, out_a.data()},
                           {&sh.b, cap_ids.data(), n, out_b.data()},
                           {&sh.d, d_ids.data(), n, out_d.data()}});
      check_counter_rows(counter_ids, out_a, "lookup_tables");
      sh.d.apply_gradients(d_ids.data(), n, grads.data(), lrs, 2, it, it % 5 == 0 ? kFarTs : ts, (it + t) % 2 == 0);
      sh.d.lookup(d_ids.data(), n, out_d.data());
      if (it % 10 == 9) sh.d.evict(ts - 1);  // a pass, nothing expires
    }
    // 10. Fused ops over A (gradient ids) and B, two shards: blocks [shard][table].
    if (t % 2 == 0 && it % 3 == 1) {
      const size_t per = large ? 2100 : 120;  // ids per block
      const std::vector<int32_t> fss(4, static_cast<int32_t>(per));
      std::vector<int64_t> ids(4 * per);
      for (size_t blk = 0; blk < 4; ++blk)
        for (size_t i = 0; i < per; ++i)
          ids[blk * per + i] = blk % 2 == 0 ? kGradBase + rng.below(kGradIds) : rng.below(kCapacityIds);
      const mtht::FusedLayout layout = mtht::fused_layout({kDim, kDim}, fss.data(), fss.size(), 2, ids.size());
      std::vector<float> grads(ids.size() * kDim);
      for (auto& g : grads) g = static_cast<float>(rng.below(200) - 100) / 100.0f;
      const float lrs[2] = {0.01f, 0.01f};
      try {
        mtht::fused_apply_gradients({&sh.a, &sh.b}, layout, ids.data(), grads.data(), grads.size(), lrs, 2, it, ts,
                                    {uint8_t(it % 2), 1});
      } catch (const mtht::ValueError& e) {
        fail(std::string("fused_apply_gradients refused: ") + e.what());
      }
      std::vector<float> out(ids.size() * kDim);
      mtht::fused_lookup({&sh.a, &sh.b}, layout, ids.data(), out.data());
    }
    // 11. The capacity-limited tables: writes that evict, reads, expiry, size within bounds.
    {
      mtht::EmbeddingTable& cap = (it + t) % 2 ? sh.b : sh.c;
      const uint64_t limit = (it + t) % 2 ? kMaxB : kMaxC;
      const size_t n = large ? 4200 : 350;
      std::vector<int64_t> ids(n);
      for (auto& id : ids) id = (t * 7000 + rng.below(kCapacityIds / 2)) % kCapacityIds;
      std::vector<float> v(n * kDim);
      for (auto& x : v) x = static_cast<float>(rng.below(100)) / 100.0f;
      try {
        switch ((it + t) % 3) {
          case 0: cap.assign_add(ids.data(), n, v.data(), ts); break;
          case 1: cap.apply_gradients(ids.data(), n, v.data(), &lr, 1, it, ts, true); break;
          default: cap.apply_gradients(ids.data(), n, v.data(), &lr, 1, it, ts, false); break;
        }
      } catch (const mtht::ValueError&) {
        ++sh.capacity_refusals;  // a batch larger than the table: refused, not a failure
      }
      std::vector<float> out(n * kDim);
      cap.lookup(ids.data(), n, out.data());
      std::vector<uint8_t> found(n);
      cap.contains(ids.data(), n, found.data());
      const uint64_t size = cap.size();
      if (size > limit) fail("a capacity-limited table holds " + std::to_string(size) + " > " + std::to_string(limit));
      // Expiry: a pass that removes nothing (100 years' default), now and then one that empties the table.
      if (it % 8 == 7) cap.evict(ts + (it % 40 == 39 ? 40000 : 1000) * 86400LL);
    }
  }
}

}  // namespace

int main() {
  char tmpl[] = "/tmp/mtht_concurrency_XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::printf("FAILED: mkdtemp\n");
    return 1;
  }
  temp_dir = tmpl;
  mtht::ThreadPool::global().set_num_threads(3);
  auto shared = std::make_unique<Shared>();
  Shared& sh = *shared;
  if (sh.a.num_shards() != 1) fail("table A does not start with one shard");

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&sh, t] {
      try {
        worker(sh, t);
      } catch (const std::exception& e) {
        fail(std::string("thread threw: ") + e.what());
      }
    });
  for (auto& th : threads) th.join();

  // Every counter equals the adds made to it, in every dim.
  std::vector<int64_t> ids(kCounters);
  std::vector<uint32_t> expected(kCounters, 0);
  for (int64_t k = 0; k < kCounters; ++k) {
    ids[k] = kCounterBase + k;
    for (int t = 0; t < kThreads; ++t) expected[k] += sh.added[t][k];
  }
  std::vector<float> out(kCounters * kDim);
  sh.a.lookup(ids.data(), ids.size(), out.data());
  int64_t wrong = 0, total = 0;
  for (int64_t k = 0; k < kCounters; ++k) {
    total += expected[k];
    for (int j = 0; j < kDim; ++j)
      if (out[k * kDim + j] != static_cast<float>(expected[k])) {
        if (wrong++ < 5)
          fail("counter " + std::to_string(ids[k]) + " dim " + std::to_string(j) + " is " +
               std::to_string(out[k * kDim + j]) + ", expected " + std::to_string(expected[k]));
      }
  }
  if (wrong) fail(std::to_string(wrong) + " counter values lost adds");
  if (sh.d.num_shards() < 2) fail("table D never split (" + std::to_string(sh.d.num_shards()) + " shards)");
  if (sh.a.num_shards() < 2) fail("table A never split (" + std::to_string(sh.a.num_shards()) + " shards)");
  if (sh.b.size() > kMaxB || sh.c.size() > kMaxC) fail("a capacity-limited table past its limit at the end");
  const uint64_t evictions = sh.b.stats().evictions + sh.c.stats().evictions;
  if (evictions == 0) fail("no capacity eviction happened");

  // A save after the threads, loaded into a new table, holds the same counters.
  {
    const std::vector<std::string> paths = checkpoint_paths("final", 3);
    mtht::save_checkpoint(sh.a, paths, sh.a.max_update_ts(), false, "concurrency_check");
    mtht::EmbeddingTable restored(spec_a());
    mtht::load_checkpoint(restored, paths, "concurrency_check");
    if (restored.size() != sh.a.size()) fail("the restored table's size differs");
    std::vector<float> back(kCounters * kDim);
    restored.lookup(ids.data(), ids.size(), back.data());
    if (back != out) fail("the restored table's counters differ");
    remove_files(paths);
  }
  ::rmdir(temp_dir.c_str());

  std::fprintf(stderr, "table D: %d shards, %llu entries\n", sh.d.num_shards(), static_cast<unsigned long long>(sh.d.size()));
  std::fprintf(stderr, "table A: %d shards, %llu entries, %lld adds; B: %d shards, %llu entries, %llu evictions; "
              "C: %llu entries, %llu evictions; %d refused batches, %d saves\n",
              sh.a.num_shards(), static_cast<unsigned long long>(sh.a.size()), static_cast<long long>(total),
              sh.b.num_shards(), static_cast<unsigned long long>(sh.b.size()),
              static_cast<unsigned long long>(sh.b.stats().evictions), static_cast<unsigned long long>(sh.c.size()),
              static_cast<unsigned long long>(sh.c.stats().evictions), sh.capacity_refusals.load(), sh.saves.load());
  if (failures.load() == 0) std::printf("ok\n");
  return failures.load() == 0 ? 0 : 1;
}
