// The types that describe a table (no functions: the per-ISA kernel units include this
// header, and an inline function compiled there with AVX flags could be picked by the linker
// for the whole library).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace mtht {

enum class InitKind : int { kZeros = 0, kOnes = 1, kConstants = 2, kRandomUniform = 3 };

enum class OptKind : int {
  kSgd = 0,
  kAdagrad = 1,
  kDynamicWdAdagrad = 2,
  kAdadelta = 3,
  kAdam = 4,
  kAmsgrad = 5,
  kFtrl = 6,
  kGroupFtrl = 7,
  kGroupAdagrad = 8,
  kMomentum = 9,
  kMovingAverage = 10,
  kRmsprop = 11,
  kRmspropV2 = 12,
  kBatchSoftmax = 13,
};
constexpr int kNumOptKinds = 14;

// How a row keeps its values (the embedding): float32, or 16 bits a value (half the
// memory); optimizer state is float32 either way.
enum class ValueFormat : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// The widest entry (sum of segment dims, plus the widest one_bit segment's) kept in 16 bits:
// a step widens it on the stack.
constexpr int kMaxNarrowDim = 4096;

// What a lookup returns and how gradients flow back (Monolith's retrievers).
enum class RetrieverKind : int { kRaw = 0, kFakeQuant = 1, kHashNet = 2 };

// Every parameter any optimizer reads; each optimizer uses the fields it names.
struct OptParams {
  float initial_accumulator_value = 0.1f;
  float weight_decay_factor = 0.0f;
  float beta = 0.0f;
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float epsilon = 0.01f;
  float l1 = 0.0f;  // l1_regularization_strength
  float l2 = 0.0f;  // l2_regularization_strength (group lasso: lambda)
  float momentum = 0.9f;
  float averaging_ratio = 0.9f;
  bool use_nesterov = false;
  bool decouple_weight_decay = false;
};

// One segment of an entry: `dim` floats with their own initializer, optimizer and retriever.
struct SegmentSpec {
  int dim = 1;
  int init = 0;        // InitKind
  float init_a = 0.f;  // constant, or minval for random_uniform
  float init_b = 0.f;  // maxval for random_uniform
  int opt = 0;         // OptKind
  OptParams opt_params;
  bool stochastic_rounding_fp16 = false;  // round this segment to fp16 values after each step
  int retriever = 0;                      // RetrieverKind
  float fake_quant_range = 1.f;           // fixed_r8: r
  int64_t hashnet_step_size = 200;        // one_bit
  float hashnet_init_scale = 1.f;
  float hashnet_max_scale = 10000.f;
  float hashnet_amplitude = 0.05f;
};

struct TableSpec {
  std::vector<SegmentSpec> segments;
  uint64_t random_seed = 0;
  bool allow_non_finite = false;
  int value_format = 0;  // ValueFormat
  uint64_t initial_capacity = 0;
  // A power of two in [1, 4096], fixed; or 0: the table starts with as few shards as its
  // initial capacity calls for and splits them as it grows and as its write batches grow,
  // up to 64 (EmbeddingTable::maybe_split).
  int num_shards = 0;
  // With an automatic count: the shards to start with, whatever the initial capacity (a
  // restore starts with the shards of the table it restores, on which the filter's
  // generations depend; a table saved before a split it was due splits at its next write,
  // and so does the restored one).
  uint64_t initial_shards = 0;
  // The index grows before more than this many thousandths of its slots are used, so its
  // load stays between half this and this (between 2/3 of it and it in a shard whose index
  // is over 2 MiB, which grows by half: detail::Shard::buckets_for).
  uint32_t max_load_permille = 500;
  // Capacity: 0 = unlimited; otherwise a write that would exceed it first evicts entries
  // by `eviction_policy` (0 = least recently written, 1 = least frequently written).
  uint64_t max_entries = 0;
  uint64_t max_bytes = 0;  // 0 = unlimited; else turned into a bound on entries
  int eviction_policy = 0;
  // Expiry, in days, by slot ((id >> 48) & 0x7FFF); slots not listed use the default.
  uint32_t default_expire_days = 36500;
  std::vector<std::pair<uint32_t, uint32_t>> slot_expire_days;
  // Admission filter: an absent id is admitted once it has been seen `threshold` times
  // before. No filter when `has_filter` is false.
  bool has_filter = false;
  uint32_t default_occurrence_threshold = 0;
  std::vector<std::pair<uint32_t, uint32_t>> slot_occurrence_thresholds;
  // The most counts the filter keeps, about (0 = no bound): the counts of the ids counted
  // least recently are forgotten first (detail::AdmissionCounts).
  uint64_t filter_capacity = 0;
};

}  // namespace mtht
