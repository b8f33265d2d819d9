// Values kept in 16 bits (ValueFormat::kFloat16, kBFloat16): the conversions of
// narrow_values_impl.h compiled without ISA flags (the reference, and what code outside the
// kernels calls), and the per-(seed, id, step) key of a stochastic rounding. A table calls
// the copies of its kernel set (KernelSet::widen, narrow, narrow_stochastic).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mtht/hash.h"
#include "mtht/spec_types.h"

namespace mtht {
namespace narrow16 {
#include "mtht/narrow_values_impl.h"
}  // namespace narrow16

// The key of a stochastic rounding of the entry `id` at step `step`: the noise of its value
// i is narrow16::stochastic_noise(key, i), key = stochastic_key(stochastic_step_seed(seed,
// step), id) (the first part once per batch).
inline uint64_t stochastic_step_seed(uint64_t seed, int64_t step) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(step) + 0x3c6ef372fe94f82bULL));
}
inline uint32_t stochastic_key(uint64_t step_seed, int64_t id) {
  const uint64_t k = mix64(step_seed ^ static_cast<uint64_t>(id));
  return static_cast<uint32_t>(k ^ (k >> 32));
}

// The index of a 16-bit format in KernelSet's conversions.
inline int narrow_index(ValueFormat format) { return format == ValueFormat::kBFloat16 ? 1 : 0; }

}  // namespace mtht
