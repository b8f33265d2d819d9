// Checks that a write batch in which an allocation fails changes nothing, printing one line
// per failure and "ok" when there is none. operator new is replaced by one that fails once,
// at the c-th allocation from the moment it is armed; a batch is written on two threads (so
// in several chunks of shards) with c = 0, 1, 2, ... until no allocation fails. Each failed
// attempt must leave the tables as they were (values and the admission filter's counts), and
// one that goes through (past a failure that only costs speed, or with none) must give what
// the same write gives where nothing fails. The writes: apply_gradients with and without
// dedup into one table, the fused update over two, and writes to two tables (write_tables:
// apply_gradients with and without dedup; assign and assign_add), into unlimited,
// capacity-limited (evicting) and filtered tables; then a write that takes its victims from
// those an earlier write kept. Each attempt writes from a new thread, so that the memory a
// thread keeps from one write to the next has to be allocated again. Last, a write after
// which a table with an automatic shard count splits its shards: the write goes through
// whichever allocation of the split fails, and a failed split leaves the shards as they were.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "mtht/fused.h"
#include "mtht/multi_table.h"
#include "mtht/table.h"
#include "failing_new.h"

namespace {

constexpr int kDim = 4;

int failures = 0;

void expect(bool ok, const char* what, long attempt) {
  if (ok) return;
  ++failures;
  std::printf("FAILED (allocation %ld fails): %s\n", attempt, what);
}

// Tables holding ids [0, stored) (every value 1), at most max_entries of them (0: any number),
// and a batch of `length` ids drawn from [0, drawn) followed by `added` new ids.
struct Case {
  int64_t stored, drawn, length, added;
  uint64_t max_entries;
  uint32_t threshold = 0;  // occurrences before a new id is admitted (0: at once)
  int num_shards = 64;     // 0: automatic (filled in batches too small to split the shards)
  uint64_t filter_capacity = 0;  // the admission filter's (0: no bound)
};

mtht::EmbeddingTable* filled_table(const Case& c) {
  mtht::TableSpec spec;
  mtht::SegmentSpec seg;
  seg.dim = kDim;
  seg.opt = static_cast<int>(mtht::OptKind::kSgd);
  spec.segments.push_back(seg);
  spec.num_shards = c.num_shards;
  spec.max_entries = c.max_entries;
  spec.has_filter = c.threshold > 0;
  spec.default_occurrence_threshold = c.threshold;
  spec.filter_capacity = c.filter_capacity;
  auto* t = new mtht::EmbeddingTable(spec);
  std::vector<int64_t> ids(c.stored);
  for (int64_t i = 0; i < c.stored; ++i) ids[i] = i;
  const std::vector<float> rows(ids.size() * kDim, 1.f);
  const int64_t step = c.num_shards ? c.stored : 4000;
  for (int64_t i = 0; i < c.stored; i += step)
    t->assign(ids.data() + i, static_cast<size_t>(std::min(step, c.stored - i)), rows.data(), 0);
  return t;
}

// The values of the stored ids and of the added ones (zeros when missing).
std::vector<float> values(mtht::EmbeddingTable& t, const Case& c) {
  std::vector<int64_t> ids(c.stored + c.added);
  for (int64_t i = 0; i < c.stored + c.added; ++i) ids[i] = i;
  std::vector<float> out(ids.size() * kDim);
  t.lookup(ids.data(), ids.size(), out.data());
  // Then the admission filter's counts, as (id, count, generation) in order.
  std::vector<std::tuple<int64_t, uint64_t, bool>> counts;
  for (size_t s = 0; s < t.stats().num_shards; ++s)
    t.scan_counts(s, [&](int64_t id, uint64_t n, bool older) { counts.emplace_back(id, n, older); });
  std::sort(counts.begin(), counts.end());
  for (const auto& [id, n, older] : counts) {
    out.push_back(static_cast<float>(id));
    out.push_back(static_cast<float>(n));
    out.push_back(older ? 1.f : 0.f);
  }
  return out;
}

// The batch's ids, in a scrambled order, with gradients that differ by position.
struct Batch {
  std::vector<int64_t> ids;
  std::vector<float> grads;
};

Batch batch(const Case& c, int64_t first_added = -1) {
  if (first_added < 0) first_added = c.stored;
  Batch b;
  uint64_t x = 12345;
  for (int64_t i = 0; i < c.length; ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    b.ids.push_back(static_cast<int64_t>((x >> 33) % static_cast<uint64_t>(c.drawn)));
  }
  for (int64_t i = 0; i < c.added; ++i) b.ids.push_back(first_added + i);
  for (size_t i = 0; i < b.ids.size() * kDim; ++i) b.grads.push_back(static_cast<float>(i % 7) * 0.25f);
  return b;
}

// What became of a write with one allocation armed to fail.
struct Attempt {
  bool threw = false;       // the write failed (std::bad_alloc)
  bool any_failed = false;  // the armed allocation failed (in the write, or where it only costs speed)
};

// Runs write() on a new thread with the allocation-th allocation from then on failing.
template <class Write>
Attempt attempt_failing(long allocation, Write&& write) {
  Attempt a;
  std::thread writer([&] {
    allocations_left.store(allocation);
    try {
      write();
    } catch (const std::bad_alloc&) {
      a.threw = true;
    }
    a.any_failed = allocations_left.exchange(-1) < 0;
  });
  writer.join();
  return a;
}

// Writes `write(tables)` over `num_tables` filled tables with the c-th allocation failing,
// for c = 0, 1, 2, ... until none fails (a write may go through a failure that only costs
// speed, and fail at a later allocation).
template <class Write>
void check(const Case& c, size_t num_tables, Write&& write, const std::string& name) {
  auto fresh = [&] {
    std::vector<mtht::EmbeddingTable*> tables;
    for (size_t k = 0; k < num_tables; ++k) tables.push_back(filled_table(c));
    return tables;
  };
  auto state = [&](std::vector<mtht::EmbeddingTable*>& tables) {
    std::vector<std::vector<float>> all;
    for (auto* t : tables) {
      all.push_back(values(*t, c));
      delete t;
    }
    return all;
  };
  std::vector<mtht::EmbeddingTable*> reference = fresh();
  write(reference);
  const auto after = state(reference);
  std::vector<mtht::EmbeddingTable*> untouched = fresh();
  const auto before = state(untouched);
  long failed = 0;
  for (long attempt = 0; attempt < 100000; ++attempt) {
    std::vector<mtht::EmbeddingTable*> tables = fresh();
    const auto [threw, any_failed] = attempt_failing(attempt, [&] { write(tables); });
    const auto now = state(tables);
    if (!threw) {  // the write went through, with the one failure (one that only costs speed) or none
      expect(now == after, name.c_str(), attempt);
      if (any_failed) continue;
      break;
    }
    ++failed;
    expect(now == before, name.c_str(), attempt);
  }
  if (failed == 0) {
    ++failures;
    std::printf("FAILED: %s: no allocation failed (nothing was checked)\n", name.c_str());
  }
}

// A write of c's batch into a table with an automatic shard count that splits its one shard
// in two, with the a-th allocation failing for a = 0, 1, 2, ... until none does. A split by
// size follows the write: a failure in the write leaves the table as it was, one in the
// split leaves the write done and the single shard as it was. A split by batch size comes
// before the write (`split_first`): a failure in the write leaves every entry as it was,
// the shards split or not; one in the split only puts it off until after the write.
void check_split(const Case& c, float lr, bool split_first) {
  const Batch b = batch(c);
  auto write = [&](mtht::EmbeddingTable& t) {
    t.apply_gradients(b.ids.data(), b.ids.size(), b.grads.data(), &lr, 1, 1, 7, false);
  };
  auto state = [&](mtht::EmbeddingTable* t) {
    auto v = values(*t, c);
    const size_t shards = t->stats().num_shards;
    delete t;
    return std::make_pair(v, shards);
  };
  mtht::EmbeddingTable* reference = filled_table(c);
  expect(reference->stats().num_shards == 1, "the filled table has one shard", -1);
  write(*reference);
  const auto after = state(reference);
  expect(after.second == 2, "the write splits the shards", -1);
  Case fixed = c;
  fixed.num_shards = 1;
  mtht::EmbeddingTable* one_shard = filled_table(fixed);
  write(*one_shard);
  expect(state(one_shard).first == after.first, "the split shards hold what one shard holds", -1);
  const auto before = state(filled_table(c));
  long failed_writes = 0, failed_splits = 0, failed_quietly = 0;
  for (long attempt = 0; attempt < 100000; ++attempt) {
    mtht::EmbeddingTable* t = filled_table(c);
    const auto [threw, failed] = attempt_failing(attempt, [&] { write(*t); });
    const auto now = state(t);
    if (threw) {
      ++failed_writes;
      expect(now.first == before.first && (now.second == 1 || (split_first && now.second == 2)),
             "a write that failed changed the table", attempt);
    } else if (failed) {  // in the split, or where a failure only costs memory kept for later
      ++failed_quietly;
      failed_splits += now.second == 1;
      expect(now.first == after.first && (now.second == 1 || now.second == 2),
             "a failed allocation after the write changed the table", attempt);
    } else {
      expect(now == after, "the write and split gave another table", attempt);
      break;
    }
  }
  expect(failed_writes > 0 && (split_first ? failed_quietly > 0 : failed_splits > 0),
         "allocations failed in the write and in the split", -1);
}

// Writes of new ids, each evicting as many entries, into a full capacity-limited table: the
// first scans the table for its victims and keeps the next ones in order (the kept victims);
// the second, whose c-th allocation fails for c = 0, 1, 2, ... until none does, takes its
// victims from them. A failed second write must change nothing, and once it is written again
// (nothing failing) and a third follows, the table must hold what it holds where nothing
// failed: a failure may not cost the kept victims a record (the third write would then evict
// another entry than the oldest).
void check_kept_victims(const Case& c, float lr) {
  const Batch first = batch(c), second = batch(c, c.stored + c.added), third = batch(c, c.stored + 2 * c.added);
  Case all = c;
  all.added = 3 * c.added;  // values() reads every added id
  auto write = [&](mtht::EmbeddingTable& t, const Batch& b) {
    t.apply_gradients(b.ids.data(), b.ids.size(), b.grads.data(), &lr, 1, 1, 7, false);
  };
  mtht::EmbeddingTable* reference = filled_table(c);
  write(*reference, first);
  const std::vector<float> before = values(*reference, all);
  write(*reference, second);
  write(*reference, third);
  const std::vector<float> after = values(*reference, all);
  delete reference;
  long failed = 0;
  for (long attempt = 0; attempt < 100000; ++attempt) {
    mtht::EmbeddingTable* t = filled_table(c);
    write(*t, first);
    const auto [threw, any_failed] = attempt_failing(attempt, [&] { write(*t, second); });
    if (threw) {
      ++failed;
      expect(values(*t, all) == before, "a failed write that took kept victims changed the table", attempt);
      write(*t, second);
    }
    write(*t, third);
    expect(values(*t, all) == after, "after a failed write, the kept victims chose other victims", attempt);
    delete t;
    if (!any_failed) break;
  }
  expect(failed > 0, "allocations failed in a write that took kept victims", -1);
}

}  // namespace

int main() {
  mtht::ThreadPool::global().set_num_threads(2);
  const float lr = 0.5f;
  // Stored ids, most of them several times; then, into full capacity-limited tables, new ids
  // that evict entries the batch does not touch (few distinct ids: each one allocates).
  // With a filter, the stored ids are counted instead. The last case bounds the counts to
  // 4,000 over 64 shards (generations of 32 ids): the 2,000 counted ids leave about half the
  // shards just short of a turn (their older generation without slots yet), and the write's
  // 3,000 new ids turn generations over in every shard.
  for (const Case& c : {Case{20000, 20000, 60000, 0, 0}, Case{2000, 300, 6000, 100, 2000},
                        Case{2000, 300, 6000, 100, 0, 3}, Case{2000, 300, 6000, 3000, 0, 3, 64, 4000}}) {
    const Batch b = batch(c);
    const std::string limited = c.max_entries       ? " (max_entries)"
                                : c.filter_capacity ? " (admission filter with a capacity)"
                                : c.threshold       ? " (admission filter)"
                                                    : "";
    for (bool dedup : {true, false})
      check(
          c, 1,
          [&](std::vector<mtht::EmbeddingTable*>& t) {
            t[0]->apply_gradients(b.ids.data(), b.ids.size(), b.grads.data(), &lr, 1, 1, 7, dedup);
          },
          (dedup ? "a write with dedup" : "a write") + limited + " failed and changed the table");
    // The fused update over 2 tables and 2 shards: blocks (shard, table) of a quarter each.
    const int32_t quarter = static_cast<int32_t>(b.ids.size() / 4);
    const std::vector<int32_t> fss(4, quarter);
    const mtht::FusedLayout layout = mtht::fused_layout({kDim, kDim}, fss.data(), fss.size(), 2, 4 * quarter);
    const std::vector<float> lrs(2, lr);
    // Dedup in both tables, in neither, and in one only (a sharded job's update).
    for (const std::vector<uint8_t>& dedup : {std::vector<uint8_t>{1, 1}, {0, 0}, {1, 0}})
      check(
          c, 2,
          [&](std::vector<mtht::EmbeddingTable*>& t) {
            mtht::fused_apply_gradients(t, layout, b.ids.data(), b.grads.data(), 4 * quarter * kDim, lrs.data(), 2, 1,
                                        7, dedup);
          },
          "a fused update with dedup " + std::to_string(dedup[0]) + std::to_string(dedup[1]) + limited +
              " failed and changed a table");
    // A write to 2 tables (a multi-slot table's), each given half the batch.
    const size_t half = b.ids.size() / 2;
    auto two_parts = [&](std::vector<mtht::EmbeddingTable*>& t, mtht::WriteKind first, mtht::WriteKind second) {
      std::vector<mtht::TablePart> parts(2);
      for (size_t k = 0; k < 2; ++k) {
        parts[k].table = t[k];
        parts[k].kind = k == 0 ? first : second;
        parts[k].ids = b.ids.data() + k * half;
        parts[k].n = half;
        parts[k].rows = b.grads.data() + k * half * kDim;
        parts[k].lrs = &lr;
        parts[k].n_lrs = 1;
      }
      return parts;
    };
    using mtht::WriteKind;
    for (bool dedup : {true, false})
      check(
          c, 2,
          [&](std::vector<mtht::EmbeddingTable*>& t) {
            mtht::write_tables(two_parts(t, WriteKind::kApplyGradients, WriteKind::kApplyGradients), 1, 7, dedup);
          },
          (dedup ? "apply_gradients with dedup to two tables" : "apply_gradients to two tables") + limited +
              " failed and changed a table");
    check(
        c, 2,
        [&](std::vector<mtht::EmbeddingTable*>& t) {
          mtht::write_tables(two_parts(t, WriteKind::kAssign, WriteKind::kAssignAdd), 0, 7, false);
        },
        "assign and assign_add to two tables" + limited + " failed and changed a table");
  }
  // On one thread a plain write goes in input order (EmbeddingTable::write_in_order); the
  // shards whose index its ids would grow count their absent ids first (all of them here).
  mtht::ThreadPool::global().set_num_threads(1);
  for (const Case& c : {Case{20000, 20000, 60000, 0, 0}, Case{2000, 300, 6000, 100, 0}, Case{2000, 300, 6000, 100, 0, 3},
                        Case{2000, 300, 6000, 3000, 0, 3, 64, 4000}}) {
    const Batch b = batch(c);
    check(
        c, 1,
        [&](std::vector<mtht::EmbeddingTable*>& t) {
          t[0]->apply_gradients(b.ids.data(), b.ids.size(), b.grads.data(), &lr, 1, 1, 7, false);
        },
        std::string("a write on one thread") +
            (c.filter_capacity ? " (admission filter with a capacity)" : c.threshold ? " (admission filter)" : "") +
            " failed and changed the table");
  }
  mtht::ThreadPool::global().set_num_threads(2);
  check_kept_victims(Case{2000, 300, 6000, 100, 2000}, lr);
  check_split(Case{17000, 17000, 3000, 1000, 0, 0, 0}, lr, false);  // split by size (a shard over 16,384 entries)
  check_split(Case{16000, 16000, 4000, 1000, 0, 1, 0}, lr, true);  // by batch (over 4,096 ids), filter counts moved
  check_split(Case{16000, 16000, 4000, 1000, 0, 1, 0, 20000}, lr, true);  // and their generations
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
