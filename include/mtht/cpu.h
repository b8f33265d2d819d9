// What the running CPU supports, checked once.
#pragma once

#include <string>

namespace mtht {

inline std::string cpu_isas() {
  std::string out;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  out = "sse2";
  if (__builtin_cpu_supports("avx2")) out += ",avx2";
  if (__builtin_cpu_supports("fma")) out += ",fma";
  if (__builtin_cpu_supports("avx512f")) out += ",avx512f";
#elif defined(__aarch64__)
  out = "neon";
#else
  out = "generic";
#endif
  return out;
}

// The optimizer kernel path in use.
inline const char* active_kernel() { return "scalar"; }

}  // namespace mtht
