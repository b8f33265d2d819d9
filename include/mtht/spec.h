// Plain description of a table: what an entry is made of and how it is trained.
// Built by the Python configuration layer; validated here once, when a table is made.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mtht/errors.h"

namespace mtht {

enum class InitKind : int { kZeros = 0, kOnes = 1, kConstants = 2, kRandomUniform = 3 };

enum class OptKind : int { kSgd = 0, kAdagrad = 1 };

// Every parameter any optimizer reads; each optimizer uses the fields it names.
struct OptParams {
  float initial_accumulator_value = 0.1f;
  float weight_decay_factor = 0.0f;
};

// One segment of an entry: `dim` floats with their own initializer and optimizer.
struct SegmentSpec {
  int dim = 1;
  int init = 0;        // InitKind
  float init_a = 0.f;  // constant, or minval for random_uniform
  float init_b = 0.f;  // maxval for random_uniform
  int opt = 0;         // OptKind
  OptParams opt_params;
};

struct TableSpec {
  std::vector<SegmentSpec> segments;
  uint64_t random_seed = 0;
  bool allow_non_finite = false;
  uint64_t initial_capacity = 0;
  int num_shards = 64;  // a power of two
};

// Number of float32 words of optimizer state one segment keeps per entry.
inline int state_floats(const SegmentSpec& s) {
  switch (static_cast<OptKind>(s.opt)) {
    case OptKind::kSgd: return 0;
    case OptKind::kAdagrad: return s.dim;
  }
  return 0;
}

inline void validate(const TableSpec& spec) {
  if (spec.segments.empty()) throw ValueError("an entry needs at least one segment");
  long long total = 0;
  for (const auto& s : spec.segments) {
    if (s.dim < 1) throw ValueError("segment dim must be >= 1, got " + std::to_string(s.dim));
    if (s.init < 0 || s.init > 3) throw ValueError("unknown initializer kind " + std::to_string(s.init));
    if (s.opt < 0 || s.opt > 1) throw NotImplementedError("unknown optimizer kind " + std::to_string(s.opt));
    if (static_cast<InitKind>(s.init) == InitKind::kRandomUniform && !(s.init_a <= s.init_b))
      throw ValueError("random_uniform needs minval <= maxval");
    total += s.dim;
  }
  if (total > (1 << 20)) throw ValueError("entry dim too large: " + std::to_string(total));
  int n = spec.num_shards;
  if (n < 1 || n > 4096 || (n & (n - 1)) != 0) throw ValueError("num_shards must be a power of two in [1, 4096]");
}

}  // namespace mtht
