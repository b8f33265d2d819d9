// Per-segment initialisers and optimizer steps, scalar reference form.
// Each kernel touches only its own segment: `w` (dim floats of the entry) and `state`
// (state_floats(spec) floats). All float32, no fused multiply-add contraction.
#pragma once

#include <cmath>
#include <cstdint>

#include "mtht/hash.h"
#include "mtht/spec.h"

namespace mtht {

// Fill a new entry's segment `w` and its optimizer state. `first_position` is the index of
// w[0] within the whole entry, so that random values depend on (seed, id, position).
inline void init_segment(const SegmentSpec& s, float* w, float* state, uint64_t seed, int64_t id,
                         int first_position) {
  switch (static_cast<InitKind>(s.init)) {
    case InitKind::kZeros:
      for (int i = 0; i < s.dim; ++i) w[i] = 0.f;
      break;
    case InitKind::kOnes:
      for (int i = 0; i < s.dim; ++i) w[i] = 1.f;
      break;
    case InitKind::kConstants:
      for (int i = 0; i < s.dim; ++i) w[i] = s.init_a;
      break;
    case InitKind::kRandomUniform: {
      const float span = s.init_b - s.init_a;
      for (int i = 0; i < s.dim; ++i) {
        const float u = random_unit_float(random_word(seed, id, static_cast<uint64_t>(first_position + i)));
        float v = s.init_a + u * span;
        // Rounding of a + u*(b-a) can reach b; keep the half-open interval.
        if (v >= s.init_b && s.init_b > s.init_a) v = std::nextafter(s.init_b, s.init_a);
        w[i] = v;
      }
      break;
    }
  }
  switch (static_cast<OptKind>(s.opt)) {
    case OptKind::kSgd:
      break;
    case OptKind::kAdagrad:
      for (int i = 0; i < s.dim; ++i) state[i] = s.opt_params.initial_accumulator_value;
      break;
  }
}

// w -= lr * g
inline void sgd_step(int dim, float* w, const float* g, float lr) {
  for (int i = 0; i < dim; ++i) w[i] -= lr * g[i];
}

// gd = g + wd*w; norm += gd*gd; w -= lr / sqrt(norm) * gd   (one rule for every dim)
inline void adagrad_step(int dim, float* w, float* norm, const float* g, float lr, float wd) {
  for (int i = 0; i < dim; ++i) {
    const float gd = g[i] + wd * w[i];
    const float n = norm[i] + gd * gd;
    norm[i] = n;
    w[i] -= (lr / std::sqrt(n)) * gd;
  }
}

inline void optimize_segment(const SegmentSpec& s, float* w, float* state, const float* g, float lr,
                             int64_t /*global_step*/) {
  switch (static_cast<OptKind>(s.opt)) {
    case OptKind::kSgd:
      sgd_step(s.dim, w, g, lr);
      break;
    case OptKind::kAdagrad:
      adagrad_step(s.dim, w, state, g, lr, s.opt_params.weight_decay_factor);
      break;
  }
}

}  // namespace mtht
