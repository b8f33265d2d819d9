// Optimizer kernels chosen at run time from what the CPU supports.
//
// Each ISA has its own translation unit (src/kernels_<isa>.cpp) compiled with that ISA's
// flags and holding its own copy of kernels_impl.h. `MTHT_KERNEL=scalar|auto|sse2|neon|avx2|
// avx512` forces a path (an unsupported one is an error, so tests cannot silently test the
// wrong thing).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "mtht/errors.h"
#include "mtht/kernel_set.h"
#include "mtht/spec.h"

namespace mtht {

inline bool cpu_has_avx2() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2();
#else
  return false;
#endif
}

// Kernel sets this build has and this CPU can run, fastest last.
inline std::vector<const KernelSet*> available_kernel_sets() {
  std::vector<const KernelSet*> out{scalar_kernel_set(), baseline_kernel_set()};
  // The CPU check comes first: the getters live in their ISA's unit and may themselves use
  // that ISA's instructions.
  if (cpu_has_avx2() && avx2_kernel_set()) out.push_back(avx2_kernel_set());
  if (cpu_has_avx512() && avx512_kernel_set()) out.push_back(avx512_kernel_set());
  return out;
}

// The set named by MTHT_KERNEL (read each time a table is built), or the fastest one.
inline const KernelSet& select_kernel_set() {
  const auto sets = available_kernel_sets();
  const char* env = std::getenv("MTHT_KERNEL");
  std::string want = env ? env : "auto";
  if (want.empty() || want == "auto") return *sets.back();
  std::string names;
  for (const KernelSet* k : sets) {
    if (want == k->name) return *k;
    names += std::string(names.empty() ? "" : ", ") + k->name;
  }
  throw ValueError("MTHT_KERNEL=" + want + " is not available on this CPU/build; choose one of: auto, " + names);
}

}  // namespace mtht
