// Fused multi-table, multi-shard lookup and update (Monolith's fused ops).
//
// K tables and N shards; `fused_slot_size` (fss) has K*N counts laid out [shard][table]:
// fss[n*K + k] ids of shard n go to table k, and `ids` holds the blocks in that order.
// Embeddings (and gradients) are laid out the same way, block (n, k) holding fss*dim[k]
// floats. Every length is validated before any table changes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mtht/errors.h"
#include "mtht/multi_table.h"
#include "mtht/table.h"

namespace mtht {

struct FusedLayout {
  size_t num_tables = 0;
  size_t num_shards = 0;
  std::vector<int32_t> id_offsets;   // K*N + 1
  std::vector<int32_t> emb_offsets;  // K*N + 1
  std::vector<int32_t> recv_splits;  // N: floats belonging to each shard
};

inline FusedLayout fused_layout(const std::vector<int>& dims, const int32_t* fss, size_t n_fss, int64_t num_shards,
                                size_t n_ids) {
  if (num_shards < 1) throw ValueError("num_of_shards must be >= 1, got " + std::to_string(num_shards));
  FusedLayout L;
  L.num_tables = dims.size();
  L.num_shards = static_cast<size_t>(num_shards);
  if (L.num_tables == 0) throw ValueError("fused ops need at least one table");
  if (n_fss != L.num_tables * L.num_shards)
    throw ValueError("fused_slot_size must have num_tables * num_of_shards = " +
                     std::to_string(L.num_tables * L.num_shards) + " entries, got " + std::to_string(n_fss));
  L.id_offsets.assign(n_fss + 1, 0);
  L.emb_offsets.assign(n_fss + 1, 0);
  L.recv_splits.assign(L.num_shards, 0);
  int64_t ids_total = 0, floats_total = 0;
  for (size_t n = 0; n < L.num_shards; ++n) {
    int64_t shard_floats = 0;
    for (size_t k = 0; k < L.num_tables; ++k) {
      const size_t idx = n * L.num_tables + k;
      if (fss[idx] < 0) throw ValueError("fused_slot_size[" + std::to_string(idx) + "] is negative");
      ids_total += fss[idx];
      const int64_t floats = static_cast<int64_t>(fss[idx]) * dims[k];
      floats_total += floats;
      shard_floats += floats;
      if (floats_total > INT32_MAX || ids_total > INT32_MAX)
        throw ValueError("a fused call takes at most 2^31 - 1 ids and 2^31 - 1 floats of rows (its offsets are "
                         "int32), and this one has more: split it (blocks so far: " + std::to_string(ids_total) +
                         " ids, " + std::to_string(floats_total) + " floats)");
      L.id_offsets[idx + 1] = static_cast<int32_t>(ids_total);
      L.emb_offsets[idx + 1] = static_cast<int32_t>(floats_total);
    }
    L.recv_splits[n] = static_cast<int32_t>(shard_floats);
  }
  if (static_cast<size_t>(ids_total) != n_ids)
    throw ValueError("sum(fused_slot_size) = " + std::to_string(ids_total) + " but " + std::to_string(n_ids) +
                     " ids were given");
  return L;
}

namespace detail {

// The number of ids in block (n, k): those of shard n for table k.
inline size_t block_ids(const FusedLayout& L, size_t n, size_t k) {
  const size_t idx = n * L.num_tables + k;
  return static_cast<size_t>(L.id_offsets[idx + 1] - L.id_offsets[idx]);
}

// The ids of table k from every shard, in shard order, and where each block came from.
struct TableGather {
  std::vector<int64_t> ids;
  std::vector<uint32_t> block;  // shard of each gathered id
  std::vector<size_t> begin;    // num_shards + 1: where each shard's block starts in ids
};

inline TableGather gather_table(const FusedLayout& L, const int64_t* ids, size_t k) {
  TableGather g;
  g.begin.push_back(0);
  for (size_t n = 0; n < L.num_shards; ++n) g.begin.push_back(g.begin.back() + block_ids(L, n, k));
  g.ids.reserve(g.begin.back());
  g.block.reserve(g.begin.back());
  for (size_t n = 0; n < L.num_shards; ++n) {
    const size_t idx = n * L.num_tables + k;
    g.ids.insert(g.ids.end(), ids + L.id_offsets[idx], ids + L.id_offsets[idx + 1]);
    g.block.insert(g.block.end(), g.begin[n + 1] - g.begin[n], static_cast<uint32_t>(n));
  }
  return g;
}

}  // namespace detail

// embeddings: emb_offsets.back() floats. Missing ids read as zeros. The ids of table k are
// its blocks (n, k), n < N, read in place, each block's rows going straight to its place:
// a task looks up one piece of a table's ids (detail::ReadPieces), which may span blocks.
inline void fused_lookup(const std::vector<const EmbeddingTable*>& tables, const FusedLayout& L, const int64_t* ids,
                         float* embeddings) {
  const detail::ForkGate::InCall in_call;
  const size_t K = L.num_tables, N = L.num_shards;
  const size_t total = static_cast<size_t>(L.id_offsets.back());
  const size_t threads = EmbeddingTable::batch_threads(total);
  std::vector<size_t> counts(K, 0);  // each table's ids
  for (size_t k = 0; k < K; ++k)
    for (size_t n = 0; n < N; ++n) counts[k] += detail::block_ids(L, n, k);
  const detail::ReadPieces pieces(std::move(counts), threads);
  const bool streamed = static_cast<size_t>(L.emb_offsets.back()) * sizeof(float) >= detail::kStreamedOutputBytes;
  ThreadPool::global().parallel_for(
      pieces.size(),
      [&](size_t i) {
        const size_t k = pieces.part(i), b = pieces.begin(i), e = pieces.end(i);
        const size_t d = static_cast<size_t>(tables[k]->dim());
        std::vector<EmbeddingTable::IdSpan> spans;  // the parts of blocks in [b, e)
        std::vector<float*> outs;
        for (size_t n = 0, at = 0; n < N && at < e; ++n) {  // `at`: table k's ids before block n
          const size_t idx = n * K + k;
          const size_t len = detail::block_ids(L, n, k);
          const size_t lo = std::max(b, at), hi = std::min(e, at + len);
          if (lo < hi) {
            spans.push_back({ids + L.id_offsets[idx] + (lo - at), hi - lo});
            outs.push_back(embeddings + L.emb_offsets[idx] + (lo - at) * d);
          }
          at += len;
        }
        tables[k]->lookup_spans(spans.data(), spans.size(), outs.data(), streamed);
      },
      static_cast<int>(threads));
}

// One BatchOptimize per (shard, table) block: grads laid out like the lookup's embeddings,
// `lrs` the per-segment learning rates of every table concatenated in table order. The
// blocks of one table are applied in shard order, so an id reached from several shards is
// stepped in shard order whatever the thread count; with `accumulate[k]`, duplicates of
// table k are summed inside a block only (one flag per table: a sharded job sends the ids
// of a table with an admission filter as they occur, the others summed per id).
inline void fused_apply_gradients(const std::vector<EmbeddingTable*>& tables, const FusedLayout& L, const int64_t* ids,
                                  const float* grads, size_t n_grads, const float* lrs, size_t n_lrs,
                                  int64_t global_step, int64_t ts, const std::vector<uint8_t>& accumulate) {
  const detail::HeldWrites writing(tables);  // before the fork gate (EmbeddingTable::WriteHold)
  const detail::ForkGate::InCall in_call;
  if (accumulate.size() != tables.size())
    throw ValueError("accumulate must have one flag per table (" + std::to_string(tables.size()) + "), got " +
                     std::to_string(accumulate.size()));
  if (n_grads != static_cast<size_t>(L.emb_offsets.back()))
    throw ValueError("id_grads must have " + std::to_string(L.emb_offsets.back()) + " floats, got " +
                     std::to_string(n_grads));
  size_t total_segments = 0;
  std::vector<size_t> lr_begin;
  for (auto* t : tables) {
    lr_begin.push_back(total_segments);
    total_segments += static_cast<size_t>(t->num_segments());
  }
  if (n_lrs != total_segments)
    throw ValueError("learning_rate_tensors must have " + std::to_string(total_segments) +
                     " values (one per segment of every table), got " + std::to_string(n_lrs));
  // Validate everything before the first table changes.
  for (size_t k = 0; k < L.num_tables; ++k) {
    tables[k]->check_learning_rates(lrs + lr_begin[k], static_cast<size_t>(tables[k]->num_segments()));
    tables[k]->check_step(global_step);
    for (size_t n = 0; n < L.num_shards; ++n) {
      const size_t idx = n * L.num_tables + k;
      tables[k]->check_finite(grads + L.emb_offsets[idx], static_cast<size_t>(L.emb_offsets[idx + 1] - L.emb_offsets[idx]),
                              "gradients");
    }
  }
  // Each table's ids are gathered, planned and given room, and with `accumulate` grouped by
  // id with their gradients summed (a task per table; this is where the update allocates),
  // then the tables are updated, a task each (each table's own blocks stay in shard order).
  const size_t K = L.num_tables;
  for (size_t k = 0; k < K; ++k) {
    size_t ids_of_table = 0;
    for (size_t n = 0; n < L.num_shards; ++n) ids_of_table += detail::block_ids(L, n, k);
    tables[k]->split_for_batch(ids_of_table);
  }
  const detail::HeldLayouts held(tables);  // before the plans: it outlives them
  struct TableWrite {
    detail::TableGather gathered;
    std::vector<int64_t> shift;                  // see grad_rows
    std::optional<detail::PlannedWrite> planned;  // its plan, the room it holds, its runs
  };
  std::vector<TableWrite> writes(K);
  // Gradients are read in place (no per-table copy of them): gathered position i of table k
  // is row i - begin[n] of block (n, k), n = block[i].
  auto grad_rows = [&](size_t k) {
    const TableWrite& w = writes[k];
    return [grads, shift = w.shift.data(), block = w.gathered.block.data(), d = tables[k]->dim()](size_t i) {
      return grads + (shift[block[i]] + static_cast<int64_t>(i) * d);
    };
  };
  detail::write_all_or_none(
      tables, static_cast<size_t>(L.id_offsets.back()), [](size_t) { return true; },
      [&](size_t k, bool only, bool alone) {
        TableWrite& w = writes[k];
        const detail::TableGather& g = w.gathered = detail::gather_table(L, ids, k);
        const int64_t d = tables[k]->dim();
        for (size_t n = 0; n < L.num_shards; ++n)
          w.shift.push_back(L.emb_offsets[n * K + k] - static_cast<int64_t>(g.begin[n]) * d);
        w.planned.emplace(detail::plan_part(*tables[k], g.ids.data(), g.ids.size(), accumulate[k], only, alone, ts,
                                            g.block.data()));
        if (accumulate[k]) tables[k]->group_runs(*w.planned, g.ids.data(), g.block.data(), grad_rows(k));
      },
      [&](size_t k) {
        const TableWrite& w = writes[k];
        tables[k]->apply_gradient_rows(w.gathered.ids.data(), w.gathered.ids.size(), grad_rows(k),
                                       lrs + lr_begin[k], global_step, ts, accumulate[k],
                                       accumulate[k] ? w.gathered.block.data() : nullptr, /*room_held=*/true,
                                       &*w.planned);
      },
      [&](size_t k) {
        const detail::TableGather& g = writes[k].gathered;
        return detail::PartIds{g.ids.data(), g.ids.size(), g.block.data(), static_cast<bool>(accumulate[k])};
      });
}

}  // namespace mtht
