// Checks the 16-bit value conversions (narrow_values.h) against models computed in double
// precision, where every float32 and every 16-bit value is exact:
//   - widening every float16 and bfloat16 encoding;
//   - rounding to nearest, ties to even, over a sweep of float32 bit patterns and at every
//     float16 midpoint, with saturation, Inf and NaN;
//   - stochastic rounding: over every value of the dropped bits' noise, the mean of the
//     results is exactly the input (unbiased), and each result is one of its neighbours;
//   - every kernel set's copy of the row loops gives the bits of the reference copy, and its
//     fused step of a one-segment entry the bits of its general path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "mtht/kernels.h"
#include "mtht/narrow_values.h"
#include "mtht/spec.h"

namespace mtht::narrow16 {  // the reference: a copy compiled without ISA flags
#include "mtht/narrow_values_impl.h"
}  // namespace mtht::narrow16

using namespace mtht;
using namespace mtht::narrow16;

namespace {

int failures = 0;

void expect(bool ok, const char* what, uint32_t bits) {
  if (!ok && ++failures <= 20) std::printf("FAIL %s at 0x%08x\n", what, bits);
}

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// A 16-bit format: mantissa bits, least normal exponent, largest finite value.
struct Format {
  int mantissa;
  int min_exponent;
  double max;
  float (*widen)(uint16_t);
  uint16_t (*nearest)(float);
};
const Format kHalf{10, -14, 65504.0, float16_to_float, float16_nearest};
const Format kBrain{7, -126, 3.3895313892515355e38, bfloat16_to_float, bfloat16_nearest};

// The spacing of the format's values around magnitude a (finite, a > 0).
double spacing(const Format& f, double a) {
  int e;
  std::frexp(a, &e);  // a = m * 2^e, 0.5 <= m < 1
  return std::ldexp(1.0, std::max(e - 1, f.min_exponent) - f.mantissa);
}

// x rounded to nearest, ties to even, saturated: the model.
double model_nearest(const Format& f, double x) {
  const double a = std::fabs(x);
  if (a == 0) return x;
  const double s = spacing(f, a);
  const double q = a / s, lo = std::floor(q), frac = q - lo;
  double r = (frac > 0.5 || (frac == 0.5 && std::fmod(lo, 2.0) == 1.0)) ? (lo + 1) * s : lo * s;
  if (r > f.max) r = f.max;
  return std::copysign(r, x);
}

void check_widen() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    const float got = float16_to_float(static_cast<uint16_t>(h));
    if (e == 31) {
      expect(m ? std::isnan(got) : (std::isinf(got) && std::signbit(got) == (sign < 0)), "float16 Inf/NaN widen", h);
      continue;
    }
    const double want = sign * (e ? std::ldexp(1024.0 + m, static_cast<int>(e) - 25) : std::ldexp(double(m), -24));
    expect(static_cast<double>(got) == want && std::signbit(got) == (sign < 0), "float16 widen", h);
    expect(float16_nearest(got) == h, "float16 widen then narrow", h);
    // bfloat16: the top half of a float32.
    const float b = bfloat16_to_float(static_cast<uint16_t>(h));
    expect(to_bits(b) == (h << 16), "bfloat16 widen", h);
  }
}

void check_nearest_at(const Format& f, const char* name, uint32_t bits) {
  const float x = from_bits(bits);
  const uint16_t r = f.nearest(x);
  const float got = f.widen(r);
  if (std::isnan(x)) {
    expect(std::isnan(got), name, bits);
  } else if (std::isinf(x)) {
    expect(got == x, name, bits);
  } else {
    const double want = model_nearest(f, x);
    expect(static_cast<double>(got) == want && std::signbit(got) == std::signbit(x), name, bits);
  }
}

void check_nearest() {
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 61) {
    check_nearest_at(kHalf, "float16 nearest", static_cast<uint32_t>(b));
    check_nearest_at(kBrain, "bfloat16 nearest", static_cast<uint32_t>(b));
  }
  // Every float16 midpoint and its float32 neighbours (ties go to even).
  for (uint32_t h = 0; h < 0x7BFF; ++h) {
    const double mid = (static_cast<double>(float16_to_float(static_cast<uint16_t>(h))) +
                        float16_to_float(static_cast<uint16_t>(h + 1))) / 2;
    const uint32_t m = to_bits(static_cast<float>(mid));
    for (uint32_t d : {m - 1, m, m + 1, m | 0x80000000u, (m - 1) | 0x80000000u}) check_nearest_at(kHalf, "float16 tie", d);
  }
  // bfloat16 ties and their neighbours at every exponent.
  for (uint32_t e = 0; e < 255; ++e)
    for (uint32_t low : {0x7FFFu, 0x8000u, 0x8001u, 0x18000u, 0x17FFFu})
      check_nearest_at(kBrain, "bfloat16 tie", (e << 23) + low);
  for (float x : {65504.f, 65519.99f, 65520.f, 1e9f, 3.4028235e38f, -3.4028235e38f, 1e-45f, -0.f})
    check_nearest_at(kHalf, "float16 edge", to_bits(x));
}

// Every noise value of a stochastic rounding of x: the mean of the results is x, and each
// result is one of the two neighbours.
void check_stochastic_at(bool brain, float x) {
  const Format& f = brain ? kBrain : kHalf;
  const uint32_t noises = brain ? 65536 : 8192;
  const double a = std::fabs(static_cast<double>(x));
  const double s = spacing(f, a), down = std::floor(a / s) * s;
  double sum = 0;
  for (uint32_t n = 0; n < noises; ++n) {
    const float got = f.widen(brain ? bfloat16_stochastic(x, n) : float16_normal_stochastic(x, n));
    const double g = std::fabs(static_cast<double>(got));
    expect((g == down || g == std::min(down + s, f.max)) && std::signbit(got) == std::signbit(x),
           brain ? "bfloat16 stochastic neighbour" : "float16 stochastic neighbour", to_bits(x));
    sum += got;
  }
  const double clamped = std::copysign(std::min(a, f.max), x);
  expect(sum / noises == clamped, brain ? "bfloat16 stochastic mean" : "float16 stochastic mean", to_bits(x));
}

void check_stochastic() {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 300; ++i) {
    // bfloat16: any finite magnitude; float16: normal magnitudes below 65504.
    const uint32_t any = static_cast<uint32_t>(rng()) & 0xFF7FFFFFu;  // exponent below 255
    check_stochastic_at(true, from_bits(any));
    const float half = static_cast<float>(std::ldexp(std::uniform_real_distribution<double>(1, 2)(rng),
                                                     static_cast<int>(rng() % 30) - 14)) * ((rng() & 1) ? 1.f : -1.f);
    if (std::fabs(half) < 65504.f) check_stochastic_at(false, half);
  }
  // Past the largest value: every draw saturates.
  for (uint32_t n = 0; n < 8192; n += 7) expect(float16_normal_stochastic(70000.f, n) == 0x7BFF, "float16 saturate", n);
  for (uint32_t n = 0; n < 65536; n += 7)
    expect(bfloat16_stochastic(3.4e38f, n) == 0x7F7F && bfloat16_stochastic(-3.4e38f, n) == 0xFF7F, "bfloat16 saturate",
           n);
  // float16 subnormals: up with the fraction's probability, to within 2^-24, over a
  // stratified set of noise words.
  for (float x : {3.3e-7f, -1.7e-6f, 6.0e-5f, 2.9e-8f}) {
    const double scaled = std::fabs(double(x)) * 16777216.0, frac = scaled - std::floor(scaled);
    const int draws = 1 << 16;
    int up = 0;
    for (int k = 0; k < draws; ++k) {
      const uint64_t noise = (static_cast<uint64_t>(k) << 48) | (uint64_t{1} << 39);  // u = (k + 1/2) / 2^16
      const uint16_t r = float16_subnormal_stochastic(x, noise);
      const double g = std::fabs(double(float16_to_float(r))) * 16777216.0;
      expect(g == std::floor(scaled) || g == std::floor(scaled) + 1, "float16 subnormal neighbour", to_bits(x));
      up += g > std::floor(scaled);
    }
    expect(std::fabs(double(up) / draws - frac) <= 1.0 / draws, "float16 subnormal mean", to_bits(x));
  }
}

void narrow_values_stochastic(ValueFormat fmt, const float* src, uint16_t* dst, size_t n, uint64_t seed, int64_t id,
                              int64_t step) {
  const uint32_t key = stochastic_key(stochastic_step_seed(seed, step), id);
  if (fmt == ValueFormat::kBFloat16) narrow_bfloat16_stochastic(src, dst, n, key);
  else narrow_float16_stochastic(src, dst, n, key);
}

// A row's stochastic rounding draws from (seed, id, step, position) alone.
void check_rows() {
  std::vector<float> src(70);
  for (size_t i = 0; i < src.size(); ++i) src[i] = 1.0f + static_cast<float>(i) * 1e-4f + ((i % 5 == 0) ? 1e-6f : 0.f);
  src[3] = 1e-6f;  // a float16 subnormal among normal values
  for (ValueFormat fmt : {ValueFormat::kFloat16, ValueFormat::kBFloat16}) {
    std::vector<uint16_t> a(70), b(70), c(70), d(70);
    narrow_values_stochastic(fmt, src.data(), a.data(), 70, 1, 42, 7);
    narrow_values_stochastic(fmt, src.data(), b.data(), 70, 1, 42, 7);
    narrow_values_stochastic(fmt, src.data(), c.data(), 70, 1, 43, 7);
    narrow_values_stochastic(fmt, src.data(), d.data(), 70, 1, 42, 8);
    expect(a == b, "same draw", 0);
    expect(a != c && a != d, "another id or step draws again", 0);
    // A prefix of a row rounds as the whole row does (each value has its own noise).
    std::vector<uint16_t> e(5);
    narrow_values_stochastic(fmt, src.data(), e.data(), 5, 1, 42, 7);
    expect(std::equal(e.begin(), e.end(), a.begin()), "a prefix rounds alike", 0);
    const Format& f = fmt == ValueFormat::kFloat16 ? kHalf : kBrain;
    for (size_t i = 0; i < 70; ++i) {
      const double x = src[i], s = spacing(f, x), g = f.widen(a[i]);
      expect(g == std::floor(x / s) * s || g == std::floor(x / s) * s + s, "row value neighbour", static_cast<uint32_t>(i));
    }
    std::vector<float> back(70);
    if (fmt == ValueFormat::kBFloat16) widen_bfloat16(a.data(), back.data(), 70);
    else widen_float16(a.data(), back.data(), 70);
    for (size_t i = 0; i < 70; ++i) expect(back[i] == f.widen(a[i]), "widen a row", static_cast<uint32_t>(i));
    if (fmt == ValueFormat::kBFloat16) narrow_bfloat16(src.data(), e.data(), 5);
    else narrow_float16(src.data(), e.data(), 5);
    for (size_t i = 0; i < 5; ++i) expect(e[i] == f.nearest(src[i]), "narrow a row", static_cast<uint32_t>(i));
  }
  // The values of a row draw independently, float16 subnormals too: 64 equal values half a
  // spacing past a float16 subnormal do not round alike within every group of 4.
  std::vector<float> ties(64, static_cast<float>(std::ldexp(5.5, -24)));
  std::vector<uint16_t> out(64);
  narrow_values_stochastic(ValueFormat::kFloat16, ties.data(), out.data(), 64, 3, 9, 1);
  bool mixed = false;
  for (size_t g = 0; g < 64; g += 4) mixed = mixed || out[g] != out[g + 1] || out[g] != out[g + 2] || out[g] != out[g + 3];
  expect(mixed, "float16 subnormals draw apart", 0);
}

// Rows of every length up to 70 (the vector loops' bodies and remainders), of random bit
// patterns (every class: subnormal, normal, past the range, Inf, NaN): every kernel set gives
// the reference's bits.
void check_kernel_sets() {
  std::mt19937_64 rng(11);
  for (const KernelSet* k : available_kernel_sets()) {
    for (size_t n = 0; n <= 70; ++n) {
      std::vector<float> v(n);
      std::vector<uint16_t> h(n), want(n), got(n);
      for (size_t i = 0; i < n; ++i) {
        const uint32_t r = static_cast<uint32_t>(rng());
        v[i] = (rng() % 4 == 0) ? from_bits(r) : from_bits((r & 0x80FFFFFFu) | ((96u + (r >> 24) % 64u) << 23));
        h[i] = static_cast<uint16_t>(rng());
      }
      for (int fi = 0; fi < 2; ++fi) {
        const uint32_t key = static_cast<uint32_t>(rng());
        std::vector<float> w1(n), w2(n);
        (fi ? widen_bfloat16 : widen_float16)(h.data(), w1.data(), n);
        k->widen[fi](h.data(), w2.data(), n);
        for (size_t i = 0; i < n; ++i) {
          const bool same = to_bits(w1[i]) == to_bits(w2[i]) || (std::isnan(w1[i]) && std::isnan(w2[i]));
          expect(same, k->name, static_cast<uint32_t>(i));
        }
        (fi ? narrow_bfloat16 : narrow_float16)(v.data(), want.data(), n);
        k->narrow[fi](v.data(), got.data(), n);
        expect(want == got, k->name, static_cast<uint32_t>(n));
        (fi ? narrow_bfloat16_stochastic : narrow_float16_stochastic)(v.data(), want.data(), n, key);
        k->narrow_stochastic[fi](v.data(), got.data(), n, key);
        expect(want == got, k->name, static_cast<uint32_t>(n));
      }
    }
  }
}

// A kernel set's fused step of a one-segment 16-bit entry gives the bits of its general path
// (widen, the optimizer's step, stochastic rounding), values and state; and declines the
// dims it has no loop for, changing nothing.
void check_fused_steps() {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> unit(0.1f, 1.0f);
  for (const KernelSet* k : available_kernel_sets()) {
    for (int kind = 0; kind < kNumOptKinds; ++kind) {
      for (int fi = 0; fi < 2; ++fi) {
        const NarrowStepFn fused = k->narrow_step[kind][fi];
        if (static_cast<OptKind>(kind) == OptKind::kBatchSoftmax) {
          expect(fused == nullptr, "no fused batch_softmax step", 0);
          continue;
        }
        for (int dim : {5, 8, 16, 32, 64}) {
          SegmentSpec seg;
          seg.dim = dim;
          seg.opt = kind;
          seg.opt_params.weight_decay_factor = 0.01f;
          const size_t n = static_cast<size_t>(dim), states = static_cast<size_t>(state_floats(seg));
          std::vector<uint16_t> h(n);
          std::vector<float> st(states), g(n), w(n);
          for (size_t i = 0; i < n; ++i) {
            h[i] = fi ? bfloat16_nearest(unit(rng) - 0.5f) : float16_nearest(unit(rng) - 0.5f);
            g[i] = unit(rng) - 0.55f;
          }
          for (float& v : st) v = unit(rng);
          const uint32_t key = static_cast<uint32_t>(rng());
          std::vector<uint16_t> h1 = h, h2 = h;
          std::vector<float> st1 = st, st2 = st;
          k->widen[fi](h1.data(), w.data(), n);
          k->step[kind](seg, w.data(), st1.data(), g.data(), 0.05f, 7);
          k->narrow_stochastic[fi](w.data(), h1.data(), n, key);
          const bool done = fused(seg, h2.data(), st2.data(), g.data(), 0.05f, 7, key);
          if (dim == 5) {
            expect(!done && h2 == h && st2 == st, "fused step declines", static_cast<uint32_t>(kind));
            continue;
          }
          expect(done && h1 == h2 &&  // bit for bit; SGD has no state, whose data() may be null
                     (states == 0 || std::memcmp(st1.data(), st2.data(), states * sizeof(float)) == 0),
                 "fused step as the general path", static_cast<uint32_t>(kind * 1000 + dim));
        }
      }
    }
  }
}

}  // namespace

int main() {
  check_widen();
  check_nearest();
  check_stochastic();
  check_rows();
  check_kernel_sets();
  check_fused_steps();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
