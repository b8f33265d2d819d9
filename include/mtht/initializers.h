// Initial values of a new entry: each segment's values (by its initializer) and its
// optimizer state. Random values are a pure function of (seed, id, position).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mtht/hash.h"
#include "mtht/spec.h"

namespace mtht {

// `first_position` is the index of w[0] within the whole entry.
inline void init_segment(const SegmentSpec& s, float* w, float* state, uint64_t seed, int64_t id,
                         int first_position) {
  const int d = s.dim;
  switch (static_cast<InitKind>(s.init)) {
    case InitKind::kZeros:
      for (int i = 0; i < d; ++i) w[i] = 0.f;
      break;
    case InitKind::kOnes:
      for (int i = 0; i < d; ++i) w[i] = 1.f;
      break;
    case InitKind::kConstants:
      for (int i = 0; i < d; ++i) w[i] = s.init_a;
      break;
    case InitKind::kRandomUniform: {
      const float span = s.init_b - s.init_a;
      for (int i = 0; i < d; ++i) {
        const float u = random_unit_float(random_word(seed, id, static_cast<uint64_t>(first_position + i)));
        float v = s.init_a + u * span;
        // Rounding of a + u*(b-a) can reach b; keep the half-open interval.
        if (v >= s.init_b && s.init_b > s.init_a) v = std::nextafter(s.init_b, s.init_a);
        w[i] = v;
      }
      break;
    }
  }
  const OptParams& p = s.opt_params;
  const int n = state_floats(s);
  std::memset(state, 0, sizeof(float) * n);
  switch (static_cast<OptKind>(s.opt)) {
    case OptKind::kAdagrad:
    case OptKind::kDynamicWdAdagrad:
      for (int i = 0; i < d; ++i) state[i] = p.initial_accumulator_value;
      break;
    case OptKind::kFtrl:
    case OptKind::kGroupFtrl:  // [zero | norm]
      for (int i = 0; i < d; ++i) state[d + i] = p.initial_accumulator_value;
      break;
    case OptKind::kGroupAdagrad:
      state[0] = p.initial_accumulator_value;
      break;
    case OptKind::kAdam:  // [m | v | beta1_power beta2_power]
      state[2 * d] = p.beta1;
      state[2 * d + 1] = p.beta2;
      break;
    case OptKind::kAmsgrad:  // [m | v | vhat | beta1_power beta2_power]
      state[3 * d] = p.beta1;
      state[3 * d + 1] = p.beta2;
      break;
    default:
      break;
  }
}

}  // namespace mtht
