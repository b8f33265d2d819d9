// Exercises the C++ core without Python: builds tables with every optimizer, trains them,
// and prints the kernel set chosen and a checksum of the results. Run natively and under an
// emulated CPU without AVX (qemu-x86_64 -cpu Nehalem) it shows that only the kernel units
// use ISA-specific instructions, and that every kernel set gives the same numbers; built for
// aarch64 and run under qemu-aarch64, that an ARM build gives them too.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mtht/checkpoint.h"
#include "mtht/fused.h"
#include "mtht/table.h"

int main() {
  using namespace mtht;
  double checksum = 0;
  const char* kernel = "";
  for (int opt = 0; opt < kNumOptKinds; ++opt) {
    TableSpec spec;
    SegmentSpec seg;
    seg.dim = static_cast<OptKind>(opt) == OptKind::kBatchSoftmax ? 1 : 19;
    seg.init = static_cast<int>(InitKind::kRandomUniform);
    seg.init_a = -0.05f;
    seg.init_b = 0.05f;
    seg.opt = opt;
    seg.opt_params.weight_decay_factor = 0.01f;
    seg.retriever = opt % 3;  // raw, fixed_r8, one_bit in turn
    spec.segments.push_back(seg);
    spec.random_seed = 7;
    EmbeddingTable table(spec);
    kernel = table.kernel_name();
    const size_t n = 20000;
    std::vector<int64_t> ids(n);
    std::vector<float> grads(n * seg.dim);
    for (size_t i = 0; i < n; ++i) ids[i] = static_cast<int64_t>((i * 2654435761u) % 7001) - 3000;
    for (size_t i = 0; i < grads.size(); ++i) grads[i] = static_cast<float>(static_cast<int>(i % 17) - 8) / 8.0f;
    const float lr = 0.05f;
    for (int step = 0; step < 3; ++step)
      table.apply_gradients(ids.data(), n, grads.data(), &lr, 1, step, 100 + step, step % 2 == 1);
    std::vector<float> out(n * seg.dim);
    table.lookup(ids.data(), n, out.data());
    for (float v : out) checksum += v;
  }
  std::printf("kernel %s checksum %a\n", kernel, checksum);  // every bit: builds compare exactly
  return 0;
}
