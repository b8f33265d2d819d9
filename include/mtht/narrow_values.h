// Values kept in 16 bits (ValueFormat::kFloat16, kBFloat16): the per-(seed, id, step) key of
// a stochastic rounding. The conversions are narrow_values_impl.h, compiled with each kernel
// set; a table calls its set's copies (KernelSet::widen, narrow, narrow_stochastic).
#pragma once

#include <cstdint>

#include "mtht/hash.h"
#include "mtht/spec_types.h"

namespace mtht {

// The key of a stochastic rounding of the entry `id` at step `step`: the noise of its value
// i is stochastic_noise(key, i) (narrow_values_impl.h), with
// key = stochastic_key(stochastic_step_seed(seed, step), id) (the first part once per batch).
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
