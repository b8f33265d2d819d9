// The optimizer kernels compiled for one ISA (flags set per file in CMakeLists.txt).
#include <cstdint>

#include "mtht/kernel_set.h"


namespace mtht {
namespace k_scalar {
#include "mtht/kernels_impl.h"
}  // namespace k_scalar

const KernelSet* scalar_kernel_set() {
  static const KernelSet set = k_scalar::make_kernel_set("scalar");
  return &set;
}

}  // namespace mtht
