// The optimizer kernels compiled for one ISA (flags set per file in CMakeLists.txt).
#include <cstdint>

#include "mtht/kernel_set.h"


namespace mtht {
#if defined(__x86_64__)
namespace k_avx512 {
#include "mtht/kernels_impl.h"
}  // namespace k_avx512

const KernelSet* avx512_kernel_set() {
  static const KernelSet set = k_avx512::make_kernel_set("avx512");
  return &set;
}
#else
const KernelSet* avx512_kernel_set() { return nullptr; }  // not an x86-64 build
#endif

}  // namespace mtht
