// Checks the retrievers' kernels (kernels_impl.h) of every kernel set against models written
// here with the C library, over a sweep of float32 bit patterns (every 61st, or every
// argv[1]-th: subnormals, normals, Inf, NaN, both signs) in rows of 19 values (vector bodies
// and their tails):
//   - fixed_r8: the form with branches (f >= 0 ? f + half : f - half, truncate, clamp to
//     [-128, 127] steps, NaN reads as 0), at r = 5 and r = 0.3;
//   - HashNet forward: amplitude * the C library's double tanh rounded once to float;
//   - HashNet backward: g * (amplitude * scale * fma(-y, y, 1)), y that tanh.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "mtht/kernels.h"

using namespace mtht;

namespace {

int failures = 0;

bool same(float a, float b) {
  uint32_t x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  return x == y || (std::isnan(a) && std::isnan(b));
}

void expect_same(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& in,
                 const char* kernel, const char* what) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (same(got[i], want[i])) continue;
    if (++failures <= 20) std::printf("FAIL %s %s at %a: %a, want %a\n", kernel, what, in[i], got[i], want[i]);
  }
}

float fake_quantize_model(float f, float r) {
  const float step = r / 128.f, half = step / 2.f;
  if (std::isnan(f)) return 0.f;
  const float n = std::trunc((f >= 0.f ? f + half : f - half) / step);
  return std::fmin(std::fmax(n, -128.f), 127.f) * step;
}

float tanh_model(float x) { return static_cast<float>(std::tanh(static_cast<double>(x))); }

// Applies a row function to `in` in rows of 19 values.
template <class RowFn>
std::vector<float> by_rows(const std::vector<float>& in, RowFn fn) {
  std::vector<float> out = in;
  for (size_t start = 0; start < out.size(); start += 19)
    fn(out.data() + start, static_cast<int>(std::min<size_t>(19, out.size() - start)), start);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 61;
  const size_t chunk = 1 << 20;
  std::vector<float> in(chunk), g(chunk), want(chunk);
  uint64_t pattern = 0;
  size_t checked = 0;
  while (pattern < (1ull << 32)) {
    for (size_t i = 0; i < chunk; ++i, pattern += stride) {
      const uint32_t bits = static_cast<uint32_t>(pattern);
      std::memcpy(&in[i], &bits, sizeof bits);
      g[i] = static_cast<float>(static_cast<int>(i % 23) - 11) * 0.375f;
    }
    checked += chunk;
    for (float r : {5.f, 0.3f}) {
      for (size_t i = 0; i < chunk; ++i) want[i] = fake_quantize_model(in[i], r);
      for (const KernelSet* k : available_kernel_sets())
        expect_same(by_rows(in, [&](float* v, int n, size_t) { k->fake_quantize_row(v, n, r); }), want, in, k->name,
                    "fixed_r8");
    }
    const float scale = 2.5f, amplitude = 0.05f;
    for (size_t i = 0; i < chunk; ++i) want[i] = amplitude * tanh_model(scale * in[i]);
    for (const KernelSet* k : available_kernel_sets())
      expect_same(by_rows(in, [&](float* v, int n, size_t) { k->hashnet_forward_row(v, n, scale, amplitude); }), want,
                  in, k->name, "hashnet forward");
    for (size_t i = 0; i < chunk; ++i) {
      const float y = tanh_model(scale * in[i]);
      want[i] = g[i] * (amplitude * scale * std::fma(-y, y, 1.f));
    }
    for (const KernelSet* k : available_kernel_sets()) {
      auto backward = [&](float* v, int n, size_t start) {
        k->hashnet_backward_row(in.data() + start, g.data() + start, v, n, scale, amplitude);
      };
      expect_same(by_rows(in, backward), want, in, k->name, "hashnet backward");
    }
  }
  if (failures) std::printf("%d failures in %zu floats\n", failures, checked);
  else std::printf("ok\n");
  return failures ? 1 : 0;
}
