// What the running CPU supports, checked once.
#pragma once

#include <string>

#include "mtht/kernels.h"

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

// Names of the kernel sets this CPU can run, and the one a new table would use.
inline std::string kernel_names() {
  std::string out;
  for (const KernelSet* k : available_kernel_sets()) out += std::string(out.empty() ? "" : ",") + k->name;
  return out;
}

inline std::string active_kernel() { return select_kernel_set().name; }

}  // namespace mtht
