// Checks the retrievers' kernels (kernels_impl.h) of every kernel set against models written
// here with the C library, over a sweep of float32 bit patterns (every 61st, or every
// argv[1]-th: subnormals, normals, Inf, NaN, both signs) in rows of 19 values (vector bodies
// and their tails):
//   - fixed_r8: the form with branches (f >= 0 ? f + half : f - half, truncate, clamp to
//     [-128, 127] steps, NaN reads as 0), at r = 5, 0.3 and 1 (the default);
//   - HashNet forward: amplitude * the C library's double tanh rounded once to float;
//   - HashNet backward: g * (amplitude * scale * fma(-y, y, 1)), y that tanh;
// each chunk also holds the edges: +-0, fixed_r8's ties and clamp bounds, Inf, NaN. Then a
// table's lookups of 16 MB or more through each retriever (streamed through a buffer on the
// stack where a row fits it) give each stored row as the kernel returns it, for rows of
// either side of the buffer's width.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "mtht/kernels.h"
#include "mtht/table.h"

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

// Applies a retriever fn(src, dst, n) to `in` in rows of 19 values, every other row in place
// (src == dst, as a lookup of 16-bit values calls it) and the others from `in` to a separate
// output (as a lookup of float32 values does).
template <class RetrieverFn>
std::vector<float> by_rows_in_and_out_of_place(const std::vector<float>& in, RetrieverFn fn) {
  std::vector<float> out(in.size(), -1.f);
  for (size_t start = 0, row = 0; start < out.size(); start += 19, ++row) {
    const int n = static_cast<int>(std::min<size_t>(19, out.size() - start));
    if (row % 2 == 0) {
      std::copy(in.begin() + static_cast<std::ptrdiff_t>(start), in.begin() + static_cast<std::ptrdiff_t>(start) + n,
                out.begin() + static_cast<std::ptrdiff_t>(start));
      fn(out.data() + start, out.data() + start, n);
    } else {
      fn(in.data() + start, out.data() + start, n);
    }
  }
  return out;
}

float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Values every chunk holds besides its sweep: signed zeros, fixed_r8's ties and clamp bounds
// (for r), infinities, NaN, the extremes.
std::vector<float> edges(float r) {
  const float step = r / 128.f;
  std::vector<float> out{0.f, -0.f, INFINITY, -INFINITY, NAN, 3.4028235e38f, -3.4028235e38f, from_bits(1),
                         from_bits(0x80000001u)};
  for (float n : {0.5f, 1.5f, 2.5f, 126.5f, 127.f, 127.5f, 128.f, 128.5f}) {
    out.push_back(n * step);
    out.push_back(-n * step);
  }
  return out;
}

// A table of one segment of `dim` values with `retriever`: a lookup of 16 MB or more of
// stored ids (and some absent) gives each stored row as the scalar kernel returns it.
void check_large_lookup(int retriever, int dim, float r, float amplitude) {
  TableSpec spec;
  SegmentSpec seg;
  seg.dim = dim;
  seg.opt = static_cast<int>(OptKind::kSgd);
  seg.retriever = retriever;
  if (retriever == static_cast<int>(RetrieverKind::kFakeQuant)) seg.fake_quant_range = r;
  else seg.hashnet_amplitude = amplitude;
  spec.segments.push_back(seg);
  EmbeddingTable table(spec);
  const size_t stored = 300, d = static_cast<size_t>(dim);
  std::vector<int64_t> ids(stored);
  std::vector<float> values(stored * d);
  for (size_t i = 0; i < stored; ++i) ids[i] = static_cast<int64_t>(i * 7 + 1);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(static_cast<int>(i % 41) - 20) * 0.0173f;
  table.assign(ids.data(), stored, values.data(), 0);
  const size_t n = (size_t{16} << 20) / (sizeof(float) * d) + 100;
  std::vector<int64_t> wanted(n);
  for (size_t i = 0; i < n; ++i) wanted[i] = static_cast<int64_t>((i * 2654435761u) % (stored + 20) * 7 + 1);
  std::vector<float> out(n * d), want(d), zeros(d, 0.f);
  table.lookup(wanted.data(), n, out.data());
  const KernelSet* scalar = scalar_kernel_set();
  for (size_t i = 0; i < n; ++i) {
    const size_t k = static_cast<size_t>(wanted[i] - 1) / 7;
    if (k < stored) {
      std::memcpy(want.data(), values.data() + k * d, sizeof(float) * d);
      if (retriever == static_cast<int>(RetrieverKind::kFakeQuant))
        scalar->fake_quantize_row(want.data(), want.data(), dim, r);
      else
        scalar->hashnet_forward_row(want.data(), want.data(), dim, 1.f, amplitude);
    }
    const std::vector<float> got(out.begin() + static_cast<std::ptrdiff_t>(i * d),
                                 out.begin() + static_cast<std::ptrdiff_t>((i + 1) * d));
    expect_same(got, k < stored ? want : zeros, k < stored ? want : zeros, table.kernel_name(), "a large lookup");
  }
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
    const std::vector<float> edge_values = edges(0.3f);
    std::copy(edge_values.begin(), edge_values.end(), in.begin());
    checked += chunk;
    for (float r : {5.f, 0.3f, 1.f}) {  // 1: the default range
      std::vector<float> in_r = in;
      const std::vector<float> edges_r = edges(r);
      std::copy(edges_r.begin(), edges_r.end(), in_r.begin() + static_cast<std::ptrdiff_t>(edge_values.size()));
      for (size_t i = 0; i < chunk; ++i) want[i] = fake_quantize_model(in_r[i], r);
      for (const KernelSet* k : available_kernel_sets())
        expect_same(by_rows_in_and_out_of_place(
                        in_r, [&](const float* src, float* dst, int n) { k->fake_quantize_row(src, dst, n, r); }),
                    want, in_r, k->name, "fixed_r8");
    }
    const float scale = 2.5f, amplitude = 0.07f;  // their product not a power of two: the order of products shows
    for (size_t i = 0; i < chunk; ++i) want[i] = amplitude * tanh_model(scale * in[i]);
    for (const KernelSet* k : available_kernel_sets())
      expect_same(by_rows_in_and_out_of_place(in, [&](const float* src, float* dst, int n) {
                    k->hashnet_forward_row(src, dst, n, scale, amplitude);
                  }),
                  want, in, k->name, "hashnet forward");
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
  for (int dim : {64, 256, 257, 260}) {  // streamed, streamed, and (wider than the buffer) not
    check_large_lookup(static_cast<int>(RetrieverKind::kFakeQuant), dim, 0.3f, 0.05f);
    check_large_lookup(static_cast<int>(RetrieverKind::kFakeQuant), dim, 1.f, 0.05f);
    check_large_lookup(static_cast<int>(RetrieverKind::kHashNet), dim, 1.f, 0.07f);
  }
  if (failures) std::printf("%d failures in %zu floats\n", failures, checked);
  else std::printf("ok\n");
  return failures ? 1 : 0;
}
