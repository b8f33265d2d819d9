// The optimizer kernels compiled for one ISA (flags set per file in CMakeLists.txt).
#include <cstdint>

#include "mtht/kernel_set.h"


namespace mtht {
#if defined(__x86_64__)
namespace k_avx2 {
#include "mtht/kernels_impl.h"
}  // namespace k_avx2

const KernelSet* avx2_kernel_set() {
  static const KernelSet set = k_avx2::make_kernel_set("avx2");
  return &set;
}
#else
const KernelSet* avx2_kernel_set() { return nullptr; }  // not an x86-64 build
#endif

}  // namespace mtht
