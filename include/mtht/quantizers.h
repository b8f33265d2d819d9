// Value transforms around the optimizer: the scale of Monolith's HashNet (one_bit) retriever
// and unbiased stochastic rounding to float16 values. (The retrievers' per-value transforms
// are kernels: kernels_impl.h.)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mtht/hash.h"

namespace mtht {

// The scale HashNet uses from step t on, when t is a multiple of its step size.
inline float hashnet_scale(float init_scale, float max_scale, int64_t t) {
  const float s = init_scale * std::sqrt(1.f + 0.005f * static_cast<float>(t));
  return s < max_scale ? s : max_scale;
}

namespace detail {

// Bits of the largest float16 magnitude <= |x| (|x| finite and < 65504).
inline uint32_t half_bits_toward_zero(float ax) {
  uint32_t f;
  std::memcpy(&f, &ax, sizeof f);
  const int e = static_cast<int>(f >> 23) - 127;
  if (e >= -14) return (static_cast<uint32_t>(e + 15) << 10) | ((f >> 13) & 0x3FF);
  return static_cast<uint32_t>(ax * 16777216.f);  // subnormal halves: multiples of 2^-24
}

inline float half_bits_to_float(uint32_t h) {
  const uint32_t e = h >> 10, m = h & 0x3FF;
  if (e == 0) return static_cast<float>(m) * (1.f / 16777216.f);
  const uint32_t f = ((e - 15 + 127) << 23) | (m << 13);
  float out;
  std::memcpy(&out, &f, sizeof out);
  return out;
}

}  // namespace detail

// Round x to one of its two float16 neighbours with probabilities that make the result
// unbiased (E[round(x)] = x); u is uniform in [0, 1). Saturates at +-65504; NaN/Inf pass.
inline float stochastic_round_half(float x, float u) {
  if (!std::isfinite(x)) return x;
  const float ax = std::fabs(x);
  float r;
  if (ax >= 65504.f) {
    r = 65504.f;
  } else {
    const uint32_t bits = detail::half_bits_toward_zero(ax);
    const float down = detail::half_bits_to_float(bits);
    if (down == ax) {
      r = ax;
    } else {
      const float up = detail::half_bits_to_float(bits + 1);
      r = u < (ax - down) / (up - down) ? up : down;
    }
  }
  return x < 0.f ? -r : r;
}

// Stochastic rounding of one segment, deterministic given (seed, id, step, position).
inline void stochastic_round_segment(float* w, int dim, uint64_t seed, int64_t id, int64_t step, int first_position) {
  const uint64_t stream_seed = seed ^ mix64(static_cast<uint64_t>(step) + 0x632be59bd9b4e019ULL);
  for (int i = 0; i < dim; ++i) {
    const float u = random_unit_float(random_word(stream_seed, id, static_cast<uint64_t>(first_position + i), 1));
    w[i] = stochastic_round_half(w[i], u);
  }
}

}  // namespace mtht
