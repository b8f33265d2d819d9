// Hashing and the counter-based random numbers behind deterministic initialisation.
#pragma once

#include <cstdint>

namespace mtht {

// A full-avalanche 64-bit finaliser (murmur3's fmix64): every output bit depends on
// every input bit, so the shard (top bits), group (low bits) and tag (bits 32..38)
// drawn from one hash are independent.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

inline uint64_t hash_id(int64_t id) { return mix64(static_cast<uint64_t>(id) + 0x9e3779b97f4a7c15ULL); }

// A random 64-bit word that depends only on (seed, id, position, stream): the same id
// gets the same initial row in every run, on any thread, in every table with that seed.
inline uint64_t random_word(uint64_t seed, int64_t id, uint64_t position, uint64_t stream = 0) {
  uint64_t h = mix64(seed ^ 0x243f6a8885a308d3ULL);
  h = mix64(h ^ static_cast<uint64_t>(id));
  h = mix64(h ^ (position * 0x9e3779b97f4a7c15ULL) ^ (stream << 56));
  return h;
}

// Uniform float in [0, 1) with 24 random bits (every value is exactly representable).
inline float random_unit_float(uint64_t word) {
  return static_cast<float>(word >> 40) * (1.0f / 16777216.0f);
}

}  // namespace mtht
