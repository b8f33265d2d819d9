// The 16-bit value conversions (ValueFormat::kFloat16, kBFloat16), as plain functions and
// loops over a row: widening exactly, rounding to nearest (ties to even), and rounding
// stochastically after an optimizer step (unbiased: E[round(x)] = x), so that steps smaller
// than the spacing of the 16-bit values still move an embedding on average. Rounding keeps
// finite values finite: a magnitude past the largest 16-bit value saturates to it. NaN and
// Inf pass.
//
// Included inside a namespace by each per-ISA kernel unit (src/kernels_*.cpp), like
// kernels_impl.h, and by the check of these conversions as its reference: it includes
// nothing and calls only compiler builtins. The conversions are selects rather
// than branches, so that the loops vectorise; every copy gives the same bits (integer
// arithmetic, and float operations that are exact).

namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof b);
  return b;
}
inline float bits_float(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, sizeof f);
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
  const float scaled = __builtin_fabsf(f) * 16777216.f;  // exact
  const float down = __builtin_floorf(scaled);
  const bool up = static_cast<float>(noise >> 40) * (1.0f / 16777216.0f) < scaled - down;  // the fraction is exact
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

// The noise of a stochastic narrowing: 32 bits per value, from a key per (seed, id, step)
// (stochastic_key, narrow_values.h) and the value's position, by murmur3's 32-bit
// finaliser (a bijection, so the values of a row draw apart). 32-bit lanes, so that the
// loop that rounds a row vectorises with it (a table of noise filled by 64-bit words and
// read back in vectors stalled on the stores).
inline uint32_t stochastic_noise(uint32_t key, uint32_t position) {
  uint32_t x = key ^ (position * 0x9e3779b9u);
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}
// 64 bits for a float16 subnormal (rare), which wants more than 16 of them.
inline uint64_t stochastic_subnormal_noise(uint32_t noise) {
  return static_cast<uint64_t>(stochastic_noise(noise, 0x2545f491u)) << 32;
}

// The loops over a row's n values.
inline void widen_float16(const uint16_t* h, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = float16_to_float(h[i]);
}
inline void widen_bfloat16(const uint16_t* h, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = bfloat16_to_float(h[i]);
}
inline void narrow_float16(const float* v, uint16_t* h, size_t n) {
  for (size_t i = 0; i < n; ++i) h[i] = float16_nearest(v[i]);
}
inline void narrow_bfloat16(const float* v, uint16_t* h, size_t n) {
  for (size_t i = 0; i < n; ++i) h[i] = bfloat16_nearest(v[i]);
}
// Stochastically, value i with the noise of (key, i).
inline void narrow_bfloat16_stochastic(const float* v, uint16_t* h, size_t n, uint32_t key) {
  for (size_t i = 0; i < n; ++i) h[i] = bfloat16_stochastic(v[i], stochastic_noise(key, static_cast<uint32_t>(i)) >> 16);
}
inline void narrow_float16_stochastic(const float* v, uint16_t* h, size_t n, uint32_t key) {
  uint32_t small = 0;
  for (size_t i = 0; i < n; ++i) {
    h[i] = float16_normal_stochastic(v[i], stochastic_noise(key, static_cast<uint32_t>(i)) >> 16);
    small |= (detail::float_bits(v[i]) & detail::kAbsMask) < detail::kHalfMinNormal;
  }
  if (!small) return;
  for (size_t i = 0; i < n; ++i)
    if ((detail::float_bits(v[i]) & detail::kAbsMask) < detail::kHalfMinNormal)
      h[i] = float16_subnormal_stochastic(v[i], stochastic_subnormal_noise(stochastic_noise(key, static_cast<uint32_t>(i))));
}
