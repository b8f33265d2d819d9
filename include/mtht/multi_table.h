// Several tables in one call: the lookups of a multi-slot table (lookup_tables), and writes
// that change all of the tables or none: the per-slot write of a multi-slot table
// (write_tables) and the fused update (fused.h) both run through write_all_or_none.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstddef>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "mtht/errors.h"
#include "mtht/table.h"
#include "mtht/thread_pool.h"

namespace mtht {

namespace detail {

// The plan of one table's part of a write to several tables, everything that can fail done:
// the entries it evicts chosen (`only`: no other part writes to the same table, whose first
// write would change the choice; a table written twice chooses them when it writes, and is
// checked for room by check_shared_room), room reserved for its new ids. `runs`: one
// admission per distinct id (a deduplicated write), per block when `blocks` splits it. `ts`:
// the timestamp the write stamps its entries with. `alone`: the part is written by a task of
// its own, on one thread.
inline PlannedWrite plan_part(EmbeddingTable& table, const int64_t* ids, size_t n, bool runs, bool only, bool alone,
                              int64_t ts, const uint32_t* blocks = nullptr) {
  std::optional<Victims> victims;
  if (runs && blocks && table.counts_admissions()) {  // its blocks admit as they come
    const std::vector<int64_t> counted = AdmissionCount::of(ids, n, blocks, runs);
    if (only) victims = table.victims_for(counted.data(), counted.size(), false);
    else table.check_room(counted.data(), counted.size(), false);
  } else if (only) {
    victims = table.victims_for(ids, n, runs);
  } else {
    table.check_room(ids, n, runs);
  }
  return table.reserve_ids(ids, n, std::move(victims), EmbeddingTable::far_stamp(ts), alone, runs);
}

// One part's ids as its capacity check counts them (AdmissionCount::add).
struct PartIds {
  const int64_t* ids = nullptr;
  size_t n = 0;
  const uint32_t* blocks = nullptr;
  bool runs = false;
};

// Throws, changing nothing, when a part of a table that several of the parts write could
// not fit when its turn comes: each part is checked as the write it is, its admissions
// counting the occurrences of its ids in the parts before it (which their own checks,
// plan_part, find the table without). An id of an earlier part that the part does not
// write takes no room in its check, as the write may evict it. The caller holds the
// tables' capacity locks.
template <class IdsOf>
void check_shared_room(const std::vector<EmbeddingTable*>& tables, const std::vector<EmbeddingTable*>& repeated,
                       IdsOf&& ids_of) {
  for (EmbeddingTable* table : repeated) {
    if (!table->counts_admissions()) continue;  // no admissions to carry
    std::vector<size_t> parts;
    for (size_t k = 0; k < tables.size(); ++k)
      if (tables[k] == table) parts.push_back(k);
    for (size_t p = 1; p < parts.size(); ++p) {  // the first part's own check holds
      const PartIds part = ids_of(parts[p]);
      const std::unordered_set<int64_t> written(part.ids, part.ids + part.n);
      AdmissionCount count;
      for (size_t q = 0; q < p; ++q) {
        const PartIds before = ids_of(parts[q]);
        count.add(before.ids, before.n, before.blocks, before.runs, [&](int64_t id) { return written.count(id) != 0; });
      }
      count.add(part.ids, part.n, part.blocks, part.runs);
      const std::vector<int64_t> counted = count.counted();
      table->check_room(counted.data(), counted.size(), false);
    }
  }
}

// Calls prepare(k, only, alone) for every part k (a task each on the pool; `only`: no other
// part writes its table), then write(k) for every part, holding the capacity lock of every
// capacity-limited table throughout (taken in address order, as every write to several
// tables does). The caller holds the tables' layouts (HeldLayouts). `prepare` does
// everything that can fail (plan_part) and `write` nothing that can: a part that fails to
// prepare leaves every table as it was. The parts for which pooled(k) holds are written a
// task each (each on one thread: `alone`), then the others one after the other, each spread
// over the pool. A table that is written by two parts is always written in order on the
// calling thread, once check_shared_room found each part room for its turn (`ids_of(k)`:
// part k's PartIds, once it is prepared).
template <class Pooled, class Prepare, class Write, class IdsOf>
void write_all_or_none(const std::vector<EmbeddingTable*>& tables, size_t total_ids, Pooled&& pooled,
                       Prepare&& prepare, Write&& write, IdsOf&& ids_of) {
  std::vector<EmbeddingTable*> sorted(tables.begin(), tables.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<EmbeddingTable*> repeated;  // the tables two parts or more write, in address order
  for (size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i] == sorted[i - 1] && (repeated.empty() || repeated.back() != sorted[i])) repeated.push_back(sorted[i]);
  const bool distinct = repeated.empty();
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::vector<std::unique_lock<std::mutex>> capacity_locks;
  for (EmbeddingTable* t : sorted) capacity_locks.push_back(t->lock_capacity());
  const size_t K = tables.size();
  std::vector<size_t> in_pool, after;
  std::vector<bool> alone(K), only(K);  // only[k]: no other part writes part k's table
  for (size_t k = 0; k < K; ++k) {
    only[k] = !std::binary_search(repeated.begin(), repeated.end(), tables[k]);
    alone[k] = distinct && K > 1 && pooled(k);
    (alone[k] ? in_pool : after).push_back(k);
  }
  ThreadPool::global().parallel_phases(
      {K, in_pool.size()},
      [&](size_t phase, size_t i) {
        if (phase == 1) return write(in_pool[i]);
        prepare(i, only[i], alone[i]);
      },
      EmbeddingTable::threads_for(total_ids));
  if (!distinct) check_shared_room(tables, repeated, ids_of);  // no part is written yet: all are `after`
  for (size_t k : after) write(k);
}

// The distinct tables of `tables`, in address order.
inline std::vector<EmbeddingTable*> by_address(std::vector<EmbeddingTable*> tables) {
  std::sort(tables.begin(), tables.end());
  tables.erase(std::unique(tables.begin(), tables.end()), tables.end());
  return tables;
}

// The write gates of the tables of a write to several tables, held while it lives, taken in
// address order as a save takes them (EmbeddingTable::hold_writes): a model's save holds the
// write on every table or on none. Declared before the call's ForkGate::InCall (see
// EmbeddingTable::WriteHold).
class HeldWrites {
 public:
  explicit HeldWrites(const std::vector<EmbeddingTable*>& tables) {
    const std::vector<EmbeddingTable*> ordered = by_address(tables);
    writes_.reserve(ordered.size());
    for (EmbeddingTable* t : ordered) writes_.emplace_back(*t);
  }

 private:
  std::vector<EmbeddingTable::WriteHold> writes_;
};

// The layouts of the tables of a write to several tables, held while it lives: the write's
// plans hold on to their tables' shards, so it must outlive them (be declared before them).
// Once it lets go, each table splits its shards if the write asked it to.
class HeldLayouts {
 public:
  explicit HeldLayouts(const std::vector<EmbeddingTable*>& tables) : tables_(by_address(tables)) {
    holds_.reserve(tables_.size());
    for (EmbeddingTable* t : tables_) holds_.emplace_back(*t);
  }
  ~HeldLayouts() {
    holds_.clear();
    for (EmbeddingTable* t : tables_) t->maybe_split();
  }
  HeldLayouts(const HeldLayouts&) = delete;
  HeldLayouts& operator=(const HeldLayouts&) = delete;

 private:
  std::vector<EmbeddingTable*> tables_;
  std::vector<EmbeddingTable::LayoutHold> holds_;
};

}  // namespace detail

// One table's part of lookup_tables: n ids, their rows to out (n x dim).
struct TableRead {
  const EmbeddingTable* table = nullptr;
  const int64_t* ids = nullptr;
  size_t n = 0;
  float* out = nullptr;
};

// Each part as the table's lookup would do it, all in one call of the pool.
inline void lookup_tables(const std::vector<TableRead>& parts) {
  const detail::ForkGate::InCall in_call;
  std::vector<size_t> counts;
  size_t total = 0, out_bytes = 0;
  for (const TableRead& p : parts) {
    counts.push_back(p.n);
    total += p.n;
    out_bytes += p.n * static_cast<size_t>(p.table->dim()) * sizeof(float);
  }
  const size_t threads = EmbeddingTable::batch_threads(total);
  const detail::ReadPieces pieces(std::move(counts), threads);
  const bool streamed = out_bytes >= detail::kStreamedOutputBytes;
  ThreadPool::global().parallel_for(
      pieces.size(),
      [&](size_t i) {
        const TableRead& p = parts[pieces.part(i)];
        const size_t b = pieces.begin(i), e = pieces.end(i);
        const EmbeddingTable::IdSpan span{p.ids + b, e - b};
        float* const out = p.out + b * static_cast<size_t>(p.table->dim());
        p.table->lookup_spans(&span, 1, &out, streamed);
      },
      static_cast<int>(threads));
}

enum class WriteKind { kAssign, kAssignAdd, kApplyGradients };

// One table's part of write_tables.
struct TablePart {
  EmbeddingTable* table = nullptr;
  WriteKind kind = WriteKind::kAssign;
  const int64_t* ids = nullptr;
  size_t n = 0;
  const float* rows = nullptr;  // n x dim: the values, or the gradients
  const float* lrs = nullptr;   // kApplyGradients: one learning rate per segment
  size_t n_lrs = 0;
};

// Writes every part (each as the table's assign, assign_add or apply_gradients would), or
// throws having changed no table: every part is validated, planned, given room, grouped
// (`dedup`) and has its evictions chosen before the first table changes. `global_step` and
// `dedup` concern the kApplyGradients parts; `ts` is every part's timestamp.
inline void write_tables(const std::vector<TablePart>& parts, int64_t global_step, int64_t ts, bool dedup) {
  std::vector<EmbeddingTable*> tables;
  for (const TablePart& p : parts) tables.push_back(p.table);
  const detail::HeldWrites writing(tables);  // before the fork gate
  const detail::ForkGate::InCall in_call;
  size_t total_ids = 0;
  for (const TablePart& p : parts) {
    const bool applies = p.kind == WriteKind::kApplyGradients;
    if (applies) {
      p.table->check_learning_rates(p.lrs, p.n_lrs);
      p.table->check_step(global_step);
    }
    p.table->check_finite(p.rows, p.n * static_cast<size_t>(p.table->dim()), applies ? "gradients" : "values");
    total_ids += p.n;
  }
  auto row_of = [](const TablePart& p) {
    return [rows = p.rows, d = static_cast<size_t>(p.table->dim())](size_t i) { return rows + i * d; };
  };
  for (const TablePart& p : parts) p.table->split_for_batch(p.n);
  const detail::HeldLayouts held(tables);  // before the plans: it outlives them
  std::vector<std::optional<detail::PlannedWrite>> planned(parts.size());
  // A part small enough to be written on one thread anyway is written beside the others.
  detail::write_all_or_none(
      tables, total_ids, [&](size_t k) { return EmbeddingTable::threads_for(parts[k].n) == 1; },
      [&](size_t k, bool only, bool alone) {
        const TablePart& p = parts[k];
        const bool runs = dedup && p.kind == WriteKind::kApplyGradients;
        planned[k].emplace(detail::plan_part(*p.table, p.ids, p.n, runs, only, alone, ts));
        if (runs) p.table->group_runs(*planned[k], p.ids, nullptr, row_of(p));
      },
      [&](size_t k) {
        const TablePart& p = parts[k];
        switch (p.kind) {
          case WriteKind::kAssign:
            return p.table->assign_rows(p.ids, p.n, p.rows, ts, &*planned[k]);
          case WriteKind::kAssignAdd:
            return p.table->add_rows(p.ids, p.n, p.rows, ts, &*planned[k]);
          case WriteKind::kApplyGradients:
            return p.table->apply_gradient_rows(p.ids, p.n, row_of(p), p.lrs, global_step, ts, dedup, nullptr,
                                                /*room_held=*/true, &*planned[k]);
        }
      },
      [&](size_t k) {
        const TablePart& p = parts[k];
        return detail::PartIds{p.ids, p.n, nullptr, dedup && p.kind == WriteKind::kApplyGradients};
      });
}

}  // namespace mtht
