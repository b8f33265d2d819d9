// Checks CRC-32C: the standard check value, and the dispatched CRC (the crc32 instruction
// where the CPU has it) against the table-driven one at every length from 0 to 300 and
// every start offset from 0 to 7. Prints one line per failure and "ok" when there is none.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mtht/crc32c.h"

int main() {
  int failures = 0;
  const char check[] = "123456789";
  for (uint32_t got : {mtht::crc32c(check, 9), mtht::crc32c_portable(check, 9)})
    if (got != 0xE3069283u) {
      std::printf("crc32c(\"123456789\") = %08x, expected e3069283\n", got);
      ++failures;
    }
  if (mtht::crc32c(nullptr, 0) != 0 || mtht::crc32c_portable(nullptr, 0) != 0) {
    std::printf("the CRC of no bytes is not 0\n");
    ++failures;
  }
  std::vector<unsigned char> bytes(320);
  uint64_t x = 0x9E3779B97F4A7C15ULL;
  for (unsigned char& b : bytes) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b = static_cast<unsigned char>(x);
  }
  for (size_t offset = 0; offset < 8; ++offset)
    for (size_t n = 0; n <= 300; ++n) {
      const uint32_t fast = mtht::crc32c(bytes.data() + offset, n);
      const uint32_t portable = mtht::crc32c_portable(bytes.data() + offset, n);
      if (fast != portable) {
        std::printf("offset %zu, %zu bytes: %08x, table-driven %08x\n", offset, n, fast, portable);
        ++failures;
      }
    }
  // TFRecord's mask of the check value: rotated right by 15, plus 0xa282ead8.
  const uint32_t masked = mtht::masked_crc32c(check, 9);
  const uint32_t expected = ((0xE3069283u >> 15) | (0xE3069283u << 17)) + 0xA282EAD8u;
  if (masked != expected) {
    std::printf("masked crc %08x, expected %08x\n", masked, expected);
    ++failures;
  }
  if (failures == 0) std::printf("ok\n");
  return failures ? 1 : 0;
}
