// CRC-32C (Castagnoli), the checksum of TFRecord framing: the CPU's crc32 instruction where
// it has one (SSE 4.2), else eight table lookups per 8 bytes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace mtht {

namespace detail {

constexpr uint32_t kCrc32cPoly = 0x82F63B78u;  // reflected

using Crc32cTables = std::array<std::array<uint32_t, 256>, 8>;

inline const Crc32cTables& crc32c_tables() {
  static const Crc32cTables tables = [] {
    Crc32cTables t{};
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kCrc32cPoly & (0u - (c & 1u)));
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b)
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
    return t;
  }();
  return tables;
}

// `crc` is the running register (not inverted); returns the register after `n` bytes.
inline uint32_t crc32c_update_table(uint32_t crc, const unsigned char* p, size_t n) {
  const Crc32cTables& t = crc32c_tables();
  for (; n >= 8; p += 8, n -= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
  }
  for (; n > 0; ++p, --n) crc = (crc >> 8) ^ t[0][(crc ^ *p) & 0xFF];
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) inline uint32_t crc32c_update_sse42(uint32_t crc, const unsigned char* p,
                                                                       size_t n) {
  uint64_t c = crc;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = __builtin_ia32_crc32di(c, w);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; ++p, --n) c32 = __builtin_ia32_crc32qi(c32, *p);
  return c32;
}

inline bool cpu_has_sse42() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return has;
}
#endif

}  // namespace detail

// The CRC-32C of n bytes (the standard one: crc32c("123456789") == 0xE3069283).
inline uint32_t crc32c(const void* data, size_t n) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
#if defined(__x86_64__)
  if (detail::cpu_has_sse42()) return ~detail::crc32c_update_sse42(0xFFFFFFFFu, p, n);
#endif
  return ~detail::crc32c_update_table(0xFFFFFFFFu, p, n);
}

// The table-driven CRC alone, for checking the instruction against it.
inline uint32_t crc32c_portable(const void* data, size_t n) {
  return ~detail::crc32c_update_table(0xFFFFFFFFu, static_cast<const unsigned char*>(data), n);
}

// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so that a CRC stored in
// the data does not checksum to a fixed value.
inline uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t crc = crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
}

}  // namespace mtht
