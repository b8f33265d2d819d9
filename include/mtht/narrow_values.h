// Values kept in 16 bits (ValueFormat::kFloat16, kBFloat16): conversions from and to
// float32. Reading widens exactly; writing rounds to nearest (ties to even), or, after an
// optimizer step, stochastically (unbiased: E[round(x)] = x), so that steps smaller than
// the spacing of the 16-bit values still move an embedding on average. Finite values stay
// finite: a magnitude past the largest 16-bit value saturates to it. NaN and Inf pass.
//
// The conversions are written as selects rather than branches, so that the loops over a
// row vectorise.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mtht/hash.h"
#include "mtht/spec_types.h"

namespace mtht {

namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// a where `when` holds, else b: arithmetic on masks, which the vectoriser takes where it
// would not take a branch.
inline uint32_t select(bool when, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(when))); }

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kHalfMaxBits = 0x477FE000u;     // 65504, the largest float16
constexpr uint32_t kHalfMinNormal = 0x38800000u;   // 2^-14, the smallest normal float16
constexpr uint32_t kHalfRebias = (127u - 15u) << 23;

// The float16 sign, Inf and NaN, and saturation of a float with bits x, or 0 when x is a
// finite magnitude below 65504 (`finite` then holds the rounded bits).
inline uint16_t float16_special(uint32_t x, uint32_t finite) {
  const uint32_t ax = x & kAbsMask;
  uint32_t r = select(ax >= kHalfMaxBits, 0x7BFFu, finite);
  r = select(ax == kInfBits, 0x7C00u, r);
  r = select(ax > kInfBits, 0x7E00u, r);
  return static_cast<uint16_t>(((x >> 16) & 0x8000u) | r);
}

// Magnitudes below 2^-14 as float16 subnormals: |f| * 2^24 (exact), rounded to an integer,
// ties to even, by adding and taking away 1.5 * 2^23. 1024 is the smallest normal's
// encoding, so a carry needs no case of its own. (Magnitudes from 2^-14 on give garbage
// that the caller does not select.)
inline uint32_t float16_subnormal_nearest(uint32_t ax) {
  const float small = bits_float(select(ax < kHalfMinNormal, ax, 0u)) * 16777216.f;
  return static_cast<uint32_t>(static_cast<int32_t>((small + 12582912.f) - 12582912.f));
}

}  // namespace detail

// Exact.
inline float float16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa in place
  const uint32_t exponent = shifted & 0x0F800000u;
  const uint32_t rebiased = shifted + detail::kHalfRebias;
  // Inf and NaN take the top exponent; a subnormal m * 2^-24 is 2^-14 * (1 + m / 1024)
  // less 2^-14, exactly.
  const uint32_t normal = detail::select(exponent == 0x0F800000u, rebiased + detail::kHalfRebias, rebiased);
  const float subnormal = detail::bits_float(rebiased + 0x00800000u) - detail::bits_float(detail::kHalfMinNormal);
  return detail::bits_float(detail::select(exponent == 0, detail::float_bits(subnormal), normal) | sign);
}

// To the nearest float16 value, ties to even; finite magnitudes from 65504 on saturate.
inline uint16_t float16_nearest(float f) {
  const uint32_t x = detail::float_bits(f);
  const uint32_t ax = x & detail::kAbsMask;
  // Drop 13 mantissa bits, ties to even; a carry moves into the exponent as it should.
  const uint32_t normal = (ax + 0xFFFu + ((ax >> 13) & 1u) - detail::kHalfRebias) >> 13;
  return detail::float16_special(x, detail::select(ax < detail::kHalfMinNormal, detail::float16_subnormal_nearest(ax),
                                                    normal));
}

// Up to the next float16 magnitude with probability (the dropped 13 bits) / 2^13, else down:
// exact in expectation, as the spacing is even between two neighbours. For magnitudes of at
// least 2^-14 (normal float16 values, and from 65504 on, where it saturates); `noise`
// uniform in [0, 2^16). Smaller ones: float16_subnormal_stochastic.
inline uint16_t float16_normal_stochastic(float f, uint32_t noise) {
  const uint32_t x = detail::float_bits(f);
  const uint32_t ax = x & detail::kAbsMask;
  return detail::float16_special(x, (ax + (noise & 0x1FFFu) - detail::kHalfRebias) >> 13);
}

// The same below 2^-14, where a value is a multiple of 2^-24 and a fraction: up with the
// fraction's probability, to within 2^-24 (`noise`: 64 random bits).
inline uint16_t float16_subnormal_stochastic(float f, uint64_t noise) {
  const uint32_t x = detail::float_bits(f);
  const float scaled = std::fabs(f) * 16777216.f;  // exact
  const float down = std::floor(scaled);
  const bool up = random_unit_float(noise) < scaled - down;  // the fraction is exact
  return static_cast<uint16_t>(((x >> 16) & 0x8000u) | (static_cast<uint32_t>(down) + up));
}

inline float bfloat16_to_float(uint16_t h) { return detail::bits_float(static_cast<uint32_t>(h) << 16); }

// bfloat16 from a finite magnitude's rounded bits r (>> 16 done): saturated; Inf and NaN.
inline uint16_t bfloat16_special(uint32_t x, uint32_t r) {
  const uint32_t ax = x & detail::kAbsMask;
  r = detail::select(r >= 0x7F80u, 0x7F7Fu, r);
  r = detail::select(ax == detail::kInfBits, 0x7F80u, r);
  r = detail::select(ax > detail::kInfBits, 0x7FC0u, r);  // NaN, kept a NaN
  return static_cast<uint16_t>(((x >> 16) & 0x8000u) | r);
}

// To the nearest bfloat16 value, ties to even; finite magnitudes past the largest saturate.
inline uint16_t bfloat16_nearest(float f) {
  const uint32_t x = detail::float_bits(f);
  const uint32_t ax = x & detail::kAbsMask;
  return bfloat16_special(x, (ax + 0x7FFFu + ((ax >> 16) & 1u)) >> 16);
}

// As float16_normal_stochastic, for bfloat16 (16 bits dropped), at every magnitude.
inline uint16_t bfloat16_stochastic(float f, uint32_t noise) {
  const uint32_t x = detail::float_bits(f);
  const uint32_t ax = x & detail::kAbsMask;
  return bfloat16_special(x, (ax + (noise & 0xFFFFu)) >> 16);
}

// Row values of `format` (not kFloat32) at `src`, widened into dst[0, n).
inline void widen_values(ValueFormat format, const void* src, float* dst, size_t n) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (format == ValueFormat::kBFloat16) {
    for (size_t i = 0; i < n; ++i) dst[i] = bfloat16_to_float(h[i]);
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = float16_to_float(h[i]);
  }
}

// src[0, n) rounded to nearest into row values of `format` at dst.
inline void narrow_values(ValueFormat format, const float* src, void* dst, size_t n) {
  uint16_t* h = static_cast<uint16_t*>(dst);
  if (format == ValueFormat::kBFloat16) {
    for (size_t i = 0; i < n; ++i) h[i] = bfloat16_nearest(src[i]);
  } else {
    for (size_t i = 0; i < n; ++i) h[i] = float16_nearest(src[i]);
  }
}

// The random words of a stochastic narrowing: value i takes 16 bits (i % 4) of word i / 4,
// and a float16 subnormal the word's own word of 64 (stochastic_subnormal_word).
inline uint64_t stochastic_key(uint64_t seed, int64_t id, int64_t step) {
  return mix64(mix64(seed ^ mix64(static_cast<uint64_t>(step) + 0x3c6ef372fe94f82bULL)) ^ static_cast<uint64_t>(id));
}
inline uint64_t stochastic_word(uint64_t key, size_t group) { return mix64(key ^ ((group + 1) * 0x9e3779b97f4a7c15ULL)); }
inline uint64_t stochastic_subnormal_word(uint64_t word, size_t j) { return mix64(word + j + 1); }

// src[0, n) rounded stochastically into row values of `format` at dst, the noise of value i
// a function of (seed, id, step, i) alone: reproducible on any thread count and after a
// restore, and drawn afresh at each step.
inline void narrow_values_stochastic(ValueFormat format, const float* src, void* dst, size_t n, uint64_t seed,
                                     int64_t id, int64_t step) {
  uint16_t* h = static_cast<uint16_t*>(dst);
  const uint64_t key = stochastic_key(seed, id, step);
  constexpr size_t kChunk = 64;  // values whose noise is drawn before they are rounded
  uint16_t noise[kChunk];
  for (size_t b = 0; b < n; b += kChunk) {
    const size_t m = n - b < kChunk ? n - b : kChunk;
    for (size_t k = 0; 4 * k < m; ++k) {
      const uint64_t word = stochastic_word(key, b / 4 + k);
      for (size_t j = 0; j < 4; ++j) noise[4 * k + j] = static_cast<uint16_t>(word >> (16 * j));
    }
    const float* s = src + b;
    uint16_t* d = h + b;
    if (format == ValueFormat::kBFloat16) {
      for (size_t i = 0; i < m; ++i) d[i] = bfloat16_stochastic(s[i], noise[i]);
      continue;
    }
    uint32_t small = 0;
    for (size_t i = 0; i < m; ++i) {
      d[i] = float16_normal_stochastic(s[i], noise[i]);
      small |= (detail::float_bits(s[i]) & detail::kAbsMask) < detail::kHalfMinNormal;
    }
    if (!small) continue;
    for (size_t i = 0; i < m; ++i)
      if ((detail::float_bits(s[i]) & detail::kAbsMask) < detail::kHalfMinNormal)
        d[i] = float16_subnormal_stochastic(
            s[i], stochastic_subnormal_word(stochastic_word(key, (b + i) / 4), (b + i) % 4));
  }
}

}  // namespace mtht
