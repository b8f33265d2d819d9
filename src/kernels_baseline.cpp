// The optimizer kernels compiled for one ISA (flags set per file in CMakeLists.txt).
#include <cstdint>

#include "mtht/kernel_set.h"

#if defined(__aarch64__)
#define MTHT_BASELINE_NAME "neon"
#else
#define MTHT_BASELINE_NAME "sse2"
#endif
namespace mtht {
namespace k_baseline {
#include "mtht/kernels_impl.h"
}  // namespace k_baseline

const KernelSet* baseline_kernel_set() {
  static const KernelSet set = k_baseline::make_kernel_set(MTHT_BASELINE_NAME);
  return &set;
}

}  // namespace mtht
