// Optimizer kernels: the formulas of every optimizer (and of the fixed_r8 and HashNet
// retrievers), written once as plain loops.
//
// This file is included by each per-ISA translation unit (src/kernels_*.cpp) inside its own
// namespace, so every ISA gets its own copy of every function (no ODR clash). The scalar
// unit is compiled without vectorisation and is the reference; the others are the same
// loops vectorised by the compiler for SSE2/NEON, AVX2 or AVX-512. Every unit is compiled
// with -ffp-contract=off, so no multiply-add is fused behind our back and all paths give
// bit-identical results. Per-dim instantiations (D = 1, 2, 4, ..., 128, picked by a switch
// per call) let the compiler fully unroll common dims; D = 0 is the generic loop.
//
// Included inside a namespace nested in mtht, after mtht/kernel_set.h. It calls no library
// function that could be inline (only compiler builtins), so that nothing compiled with one
// ISA's flags can leak into code run on another.

template <int D>
inline int dim_of(int d) {
  return D ? D : d;
}

inline int64_t load_i64(const float* p) {
  int64_t v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store_i64(float* p, int64_t v) { __builtin_memcpy(p, &v, sizeof v); }

// ---- SGD: w -= lr * g ----
template <int D>
void sgd(const SegmentSpec& s, float* w, float*, const float* g, float lr, int64_t) {
  const int n = dim_of<D>(s.dim);
  for (int i = 0; i < n; ++i) w[i] -= lr * g[i];
}

// ---- Adagrad (one rule for every element): gd = g + wd*w; norm += gd^2; w -= lr/sqrt(norm)*gd ----
template <int D>
void adagrad(const SegmentSpec& s, float* w, float* norm, const float* g, float lr, int64_t) {
  const int n = dim_of<D>(s.dim);
  const float wd = s.opt_params.weight_decay_factor;
  for (int i = 0; i < n; ++i) {
    const float gd = g[i] + wd * w[i];
    const float acc = norm[i] + gd * gd;
    norm[i] = acc;
    w[i] -= (lr / __builtin_sqrtf(acc)) * gd;
  }
}

// ---- Dynamic weight-decay Adagrad: coupled as Adagrad; decoupled:
//      norm += g^2; w -= lr/sqrt(norm)*g + lr*wd*w. State: norm[D], last_update_step (int64). ----
template <int D>
void dynamic_wd_adagrad(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t t) {
  const int n = dim_of<D>(s.dim);
  const float wd = s.opt_params.weight_decay_factor;
  float* norm = st;
  if (s.opt_params.decouple_weight_decay) {
    for (int i = 0; i < n; ++i) {
      const float acc = norm[i] + g[i] * g[i];
      norm[i] = acc;
      w[i] -= (lr / __builtin_sqrtf(acc)) * g[i] + lr * wd * w[i];
    }
  } else {
    adagrad<D>(s, w, norm, g, lr, t);
  }
  store_i64(st + n, t);
}

// ---- Adadelta: state accum[D], accum_update[D] ----
template <int D>
void adadelta(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t) {
  const int n = dim_of<D>(s.dim);
  const float wd = s.opt_params.weight_decay_factor, rho = s.opt_params.averaging_ratio, eps = s.opt_params.epsilon;
  float* accum = st;
  float* accum_update = st + n;
  for (int i = 0; i < n; ++i) {
    const float cg = g[i] + wd * w[i];
    const float na = accum[i] * rho + cg * cg * (1.f - rho);
    const float upd = __builtin_sqrtf(accum_update[i] + eps) / __builtin_sqrtf(na + eps) * cg;
    w[i] -= upd * lr;
    accum_update[i] = accum_update[i] * rho + upd * upd * (1.f - rho);
    accum[i] = na;
  }
}

// lr * sqrt(1 - beta2_power) / (1 - beta1_power), stored as float: the two differences in
// float, as Monolith writes them (1 - a float), the rest in double (its unqualified sqrt of
// a float is C's double sqrt). A difference is inexact once a power is below 1/2.
inline float adam_lr(float lr, float b1p, float b2p) {
  const float one_minus_b1p = 1.f - b1p, one_minus_b2p = 1.f - b2p;
  return static_cast<float>(static_cast<double>(lr) * __builtin_sqrt(static_cast<double>(one_minus_b2p)) /
                            static_cast<double>(one_minus_b1p));
}

// w - step / (sqrt(v) + eps): the float step over a double denominator, as Monolith's
// unqualified sqrt of a float (C's double sqrt) makes it, the result stored as float.
inline float adam_step(float w, float step, float v, float eps) {
  return static_cast<float>(static_cast<double>(w) -
                            static_cast<double>(step) / (__builtin_sqrt(static_cast<double>(v)) + eps));
}

// ---- Adam: state m[D], v[D], beta1_power, beta2_power (start at beta1, beta2) ----
template <int D>
void adam(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t) {
  const int n = dim_of<D>(s.dim);
  const OptParams& p = s.opt_params;
  float* m = st;
  float* v = st + n;
  float* powers = st + 2 * n;
  const float lr_t = adam_lr(lr, powers[0], powers[1]);
  const float b1 = p.beta1, b2 = p.beta2, eps = p.epsilon, wd = p.weight_decay_factor;
  const float c1 = 1.f - b1, c2 = 1.f - b2;
  if (p.use_nesterov) {
    for (int i = 0; i < n; ++i) {
      const float cg = g[i] + wd * w[i];
      const float mi = m[i] + (cg - m[i]) * c1;
      const float vi = v[i] + (cg * cg - v[i]) * c2;
      m[i] = mi;
      v[i] = vi;
      w[i] = adam_step(w[i], (cg * c1 + b1 * mi) * lr_t, vi, eps);
    }
  } else {
    for (int i = 0; i < n; ++i) {
      const float cg = g[i] + wd * w[i];
      const float mi = m[i] + (cg - m[i]) * c1;
      const float vi = v[i] + (cg * cg - v[i]) * c2;
      m[i] = mi;
      v[i] = vi;
      w[i] = adam_step(w[i], mi * lr_t, vi, eps);
    }
  }
  powers[0] *= b1;
  powers[1] *= b2;
}

// ---- AMSGrad: state m[D], v[D], vhat[D], beta1_power, beta2_power ----
template <int D>
void amsgrad(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t) {
  const int n = dim_of<D>(s.dim);
  const OptParams& p = s.opt_params;
  float* m = st;
  float* v = st + n;
  float* vhat = st + 2 * n;
  float* powers = st + 3 * n;
  const float lr_t = adam_lr(lr, powers[0], powers[1]);
  const float b1 = p.beta1, b2 = p.beta2, eps = p.epsilon, wd = p.weight_decay_factor;
  const float c1 = 1.f - b1, c2 = 1.f - b2;
  const bool nesterov = p.use_nesterov;
  for (int i = 0; i < n; ++i) {
    const float cg = g[i] + wd * w[i];
    const float mi = m[i] + (cg - m[i]) * c1;
    const float vi = v[i] + (cg * cg - v[i]) * c2;
    const float vh = (vi > vhat[i] ? vi : vhat[i]);
    m[i] = mi;
    v[i] = vi;
    vhat[i] = vh;
    const float num = nesterov ? (cg * c1 + b1 * mi) : mi;
    w[i] = adam_step(w[i], num * lr_t, vh, eps);
  }
  powers[0] *= b1;
  powers[1] *= b2;
}

// FTRL, group FTRL and group lasso divide by the learning rate: a step at rate 0 (where a
// LinearWarmup starts) would store NaN or infinities, and is left out, state and values.

// ---- FTRL (textbook sign in the L1 term): state zero[D], norm[D] ----
template <int D>
void ftrl(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t) {
  if (lr == 0.f) return;
  const int n = dim_of<D>(s.dim);
  const OptParams& p = s.opt_params;
  float* z = st;
  float* norm = st + n;
  const float l1 = p.l1, l2 = p.l2, beta = p.beta;
  for (int i = 0; i < n; ++i) {
    const float n_new = norm[i] + g[i] * g[i];
    const float sigma = (__builtin_sqrtf(n_new) - __builtin_sqrtf(norm[i])) / lr;
    const float zi = z[i] + (g[i] - sigma * w[i]);  // Monolith's zero += (g - sigma * w)
    z[i] = zi;
    norm[i] = n_new;
    const float sign = zi < 0.f ? -1.f : 1.f;
    w[i] = __builtin_fabsf(zi) > l1 ? lr * (sign * l1 - zi) / (__builtin_sqrtf(n_new) + beta + l2 * lr) : 0.f;
  }
}

// ---- Group FTRL: per element as FTRL, then shrink the whole segment by ||z||.
//      state zero[D], norm[D]; ||z|| = 0 or ||z|| < l1 gives w = 0, and so does a value
//      whose denominator is 0 (beta, norm and l2 all 0: every gradient so far was 0, so
//      its z is 0 too). ----
template <int D>
void group_ftrl(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t) {
  if (lr == 0.f) return;
  const int n = dim_of<D>(s.dim);
  const OptParams& p = s.opt_params;
  float* z = st;
  float* norm = st + n;
  float zz = 0.f;
  for (int i = 0; i < n; ++i) {
    const float n_new = norm[i] + g[i] * g[i];
    const float sigma = (__builtin_sqrtf(n_new) - __builtin_sqrtf(norm[i])) / lr;
    const float zi = z[i] + (g[i] - sigma * w[i]);  // Monolith's zero += (g - sigma * w)
    z[i] = zi;
    norm[i] = n_new;
    zz += zi * zi;
  }
  const float znorm = __builtin_sqrtf(zz);
  if (znorm == 0.f || znorm < p.l1) {
    for (int i = 0; i < n; ++i) w[i] = 0.f;
    return;
  }
  const float shrink = (p.l1 - znorm) / znorm;
  for (int i = 0; i < n; ++i) {
    const float den = p.beta + __builtin_sqrtf(norm[i]) + p.l2 * lr;
    w[i] = den != 0.f ? lr * z[i] * shrink / den : 0.f;
  }
}

// ---- Group Adagrad / group lasso: state one float, the accumulated max squared gradient ----
template <int D>
void group_adagrad(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t) {
  if (lr == 0.f) return;
  const int n = dim_of<D>(s.dim);
  const OptParams& p = s.opt_params;
  const float wd = p.weight_decay_factor, lambda = p.l2;
  float max_sq = 0.f;
  for (int i = 0; i < n; ++i) {
    const float gd = g[i] + wd * w[i];
    max_sq = (gd * gd > max_sq ? gd * gd : max_sq);
  }
  const float acc = st[0] + max_sq;
  st[0] = acc;
  const float l = lr / (p.beta + __builtin_sqrtf(acc));
  float zz = 0.f;
  for (int i = 0; i < n; ++i) {
    const float zi = (g[i] + wd * w[i]) - w[i] / l;
    zz += zi * zi;
  }
  const float znorm = __builtin_sqrtf(zz);
  if (znorm == 0.f || znorm < lambda) {
    for (int i = 0; i < n; ++i) w[i] = 0.f;
    return;
  }
  const float scale = -l * (znorm - lambda) / znorm;
  for (int i = 0; i < n; ++i) {
    const float zi = (g[i] + wd * w[i]) - w[i] / l;
    w[i] = scale * zi;
  }
}

// ---- Momentum (and Nesterov): state n[D] ----
template <int D>
void momentum(const SegmentSpec& s, float* w, float* acc, const float* g, float lr, int64_t) {
  const int n = dim_of<D>(s.dim);
  const float mu = s.opt_params.momentum, wd = s.opt_params.weight_decay_factor;
  if (s.opt_params.use_nesterov) {
    for (int i = 0; i < n; ++i) {
      const float dx = lr * (g[i] + wd * w[i]);
      const float prev = acc[i];
      const float a = mu * prev - dx;
      acc[i] = a;
      w[i] += -mu * prev + (1.f + mu) * a;
    }
  } else {
    for (int i = 0; i < n; ++i) {
      const float dx = lr * (g[i] + wd * w[i]);
      const float a = mu * acc[i] - dx;
      acc[i] = a;
      w[i] += a;
    }
  }
}

// ---- Moving average: w = mu*w + (1-mu)*g ("g" is the target value; no lr) ----
template <int D>
void moving_average(const SegmentSpec& s, float* w, float*, const float* g, float, int64_t) {
  const int n = dim_of<D>(s.dim);
  const float mu = s.opt_params.momentum, c = 1.f - mu;
  for (int i = 0; i < n; ++i) w[i] = mu * w[i] + c * g[i];
}

// ---- RMSProp v1 and v2, as Monolith computes them: dx and the new n in double, n stored
//      as float, and sqrt(n) + 1 in float from the stored n (Monolith keeps n in a float
//      variable); eta = lr / that and the step in double. v1: n = mu*n + (1-mu)*dx^2 (with
//      the learning-rate schedule); v2: n = mu*n + dx^2. ----
template <int D, bool kOneMinusMu>
void rmsprop_step(const SegmentSpec& s, float* w, float* ms, const float* g, float lr) {
  const int n = dim_of<D>(s.dim);
  const double mu = s.opt_params.momentum, wd = s.opt_params.weight_decay_factor, lrd = lr;
  for (int i = 0; i < n; ++i) {
    const double dx = static_cast<double>(g[i]) + wd * static_cast<double>(w[i]);
    const float v = static_cast<float>(kOneMinusMu ? mu * static_cast<double>(ms[i]) + (1.0 - mu) * dx * dx
                                                   : mu * static_cast<double>(ms[i]) + dx * dx);
    ms[i] = v;
    const double eta = lrd / static_cast<double>(__builtin_sqrtf(v) + 1.f);
    w[i] = static_cast<float>(static_cast<double>(w[i]) - eta * dx);
  }
}

template <int D>
void rmsprop(const SegmentSpec& s, float* w, float* ms, const float* g, float lr, int64_t) {
  rmsprop_step<D, true>(s, w, ms, g, lr);
}

template <int D>
void rmspropv2(const SegmentSpec& s, float* w, float* ms, const float* g, float lr, int64_t) {
  rmsprop_step<D, false>(s, w, ms, g, lr);
}

// ---- Batch softmax: w[0] estimates the steps between occurrences; state: last step (int64) ----
template <int D>
void batch_softmax(const SegmentSpec&, float* w, float* st, const float*, float lr, int64_t t) {
  const int64_t last = load_i64(st);
  w[0] = (1.f - lr) * w[0] + lr * static_cast<float>(t - last);
  store_i64(st, t);
}

// Instantiates `name` for common dims and the generic loop, behind one function pointer.
#define MTHT_PER_DIM(name)                                                                           \
  void name##_any(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t t) { \
    switch (s.dim) {                                                                                 \
      case 1: return name<1>(s, w, st, g, lr, t);                                                    \
      case 2: return name<2>(s, w, st, g, lr, t);                                                    \
      case 4: return name<4>(s, w, st, g, lr, t);                                                    \
      case 8: return name<8>(s, w, st, g, lr, t);                                                    \
      case 16: return name<16>(s, w, st, g, lr, t);                                                  \
      case 32: return name<32>(s, w, st, g, lr, t);                                                  \
      case 64: return name<64>(s, w, st, g, lr, t);                                                  \
      case 128: return name<128>(s, w, st, g, lr, t);                                                \
      default: return name<0>(s, w, st, g, lr, t);                                                   \
    }                                                                                                \
  }

MTHT_PER_DIM(sgd)
MTHT_PER_DIM(adagrad)
MTHT_PER_DIM(dynamic_wd_adagrad)
MTHT_PER_DIM(adadelta)
MTHT_PER_DIM(adam)
MTHT_PER_DIM(amsgrad)
MTHT_PER_DIM(ftrl)
MTHT_PER_DIM(group_ftrl)
MTHT_PER_DIM(group_adagrad)
MTHT_PER_DIM(momentum)
MTHT_PER_DIM(moving_average)
MTHT_PER_DIM(rmsprop)
MTHT_PER_DIM(rmspropv2)
#undef MTHT_PER_DIM

inline void batch_softmax_any(const SegmentSpec& s, float* w, float* st, const float* g, float lr, int64_t t) {
  batch_softmax<1>(s, w, st, g, lr, t);
}

// ---- Whether no value is NaN or Inf: none has an exponent of all ones ----
// Without a branch per value, so that the loop is vectorised at the unit's width (a write
// checks every gradient before it changes anything).
inline bool all_finite(const float* v, size_t n) {
  uint32_t bad = 0;
  for (size_t k = 0; k < n; ++k) {
    uint32_t bits;
    __builtin_memcpy(&bits, v + k, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

#include "mtht/narrow_values_impl.h"

// ---- A step of an entry of one segment whose values are kept in 16 bits (format F: 0
//      float16, 1 bfloat16), for the common dims: widened into a float32 copy, stepped, and
//      rounded back stochastically, in one function, so that a row of 16 values stays in
//      registers and the optimizer is inlined. False for other dims (the table then takes
//      its general path, which gives the same bits). ----
template <int F>
inline void widen_format(const uint16_t* h, float* w, size_t n) {
  if (F) widen_bfloat16(h, w, n);
  else widen_float16(h, w, n);
}
template <int F>
inline void narrow_format_stochastic(const float* w, uint16_t* h, size_t n, uint32_t key) {
  if (F) narrow_bfloat16_stochastic(w, h, n, key);
  else narrow_float16_stochastic(w, h, n, key);
}

// ---- fixed_r8 retriever: round half away from zero to a multiple of r/128, clamped to
//      [-128, 127] steps; NaN -> 0 ----
// Without a branch, so that it vectorises (and random signs mispredict none): the half step
// takes the value's sign; the count is clamped before it is truncated (the same, for whole
// bounds) and truncated by a conversion to int32 (exact within the bounds), whose zero takes
// the sign trunc would give it. Bit for bit the form with branches (`f >= 0 ? f + half :
// f - half`, then trunc and clamp) for every float: all 2^32 checked at r = 5 and r = 0.3.
inline float fake_quantize(float f, float step, float half) {
  const float unsigned_zero = f + 0.f;  // -0 as +0: it rounds as +0 does, up, to a +0 count
  const float shifted = unsigned_zero + __builtin_copysignf(half, unsigned_zero);
  const float q = shifted / step;
  const float above = q > -128.f ? q : -128.f;  // NaN too: its conversion would be undefined
  const float count = above < 127.f ? above : 127.f;
  const float n = __builtin_copysignf(static_cast<float>(static_cast<int32_t>(count)), count);
  const float value = n * step;
  return __builtin_isnan(f) ? 0.f : value;  // NaN reads as 0
}

// The retrievers' loops read src[i] and write dst[i] alone, so src == dst (a row changed in
// place) is as safe as two arrays apart: the compiler may vectorise them without a check.
#if defined(__clang__)
#define MTHT_NO_LOOP_CARRIED_DEPENDENCE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define MTHT_NO_LOOP_CARRIED_DEPENDENCE _Pragma("GCC ivdep")
#else
#define MTHT_NO_LOOP_CARRIED_DEPENDENCE
#endif

// fake_quantize of src[0, n) into dst, for the range r; the step is worked out once a row.
// A lookup quantizes a table's row straight into its output: a copy of the row first, then
// a quantize of the copy in place, made each row's vector loads wait for the copy's
// narrower stores (which cannot be forwarded to a wider load): fixed_r8 lookups of dim 16
// ran at 0.83x of float32 ones that way, at 0.94x now.
void fake_quantize_row(const float* src, float* dst, int n, float r) {
  const float step = r / 128.f;
  const float half = step / 2.f;
  MTHT_NO_LOOP_CARRIED_DEPENDENCE
  for (int i = 0; i < n; ++i) dst[i] = fake_quantize(src[i], step, half);
}

// ---- HashNet (one_bit) retriever: amplitude * tanh(scale * w), and its gradient ----
// tanh of a float from basic double operations alone, so that every path and platform
// gives the same float (the C library's tanhf differs by an ulp between builds): tanh(a) =
// e / (e + 2) with e = expm1(2a) = 2^k (1 + p) - 1, where 2a = k ln2 + r, |r| <= ln2 / 2,
// and p = expm1(r) is its Taylor polynomial to r^13 (the next term is under 2^-56 of p).
// For every float it is the C library's double tanh rounded to float (all 2^32 checked
// against glibc's): the double result is within a few ulps of tanh, far inside a float's.
inline float tanh_f32(float x) {
  const double a_in = __builtin_fabs(static_cast<double>(x));
  const double a = a_in < 9.5 ? a_in : 9.5;  // tanh rounds to 1 from 9.02 on (NaN: below)
  const double two_a = a + a;
  // k = round(2a / ln2), by adding 1.5 * 2^52: the sum's low bits are k as an integer.
  const double shifter = 0x1.8p52;
  const double k_shifted = two_a * 0x1.71547652b82fep0 + shifter;
  const double k = k_shifted - shifter;
  int64_t k_bits;
  __builtin_memcpy(&k_bits, &k_shifted, sizeof k_bits);
  const int64_t two_to_k_bits = (k_bits - 0x4338000000000000LL + 1023) << 52;  // 2^k, 0 <= k <= 28
  double two_to_k;
  __builtin_memcpy(&two_to_k, &two_to_k_bits, sizeof two_to_k);
  // r = 2a - k ln2, with ln2 in two parts (the first has 21 trailing zero bits: k times it is exact).
  const double r = (two_a - k * 0x1.62e42fee00000p-1) - k * 0x1.a39ef35793c76p-33;
  // p = r (1/1! + r/2! + ... + r^12/13!), by Estrin's scheme: pairs, then pairs of pairs,
  // which the CPU can work on side by side (Horner's rule is one chain of 26 operations).
  const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const double c01 = 1.0 + r * 0.5;
  const double c23 = 1.0 / 6.0 + r * (1.0 / 24.0);
  const double c45 = 1.0 / 120.0 + r * (1.0 / 720.0);
  const double c67 = 1.0 / 5040.0 + r * (1.0 / 40320.0);
  const double c89 = 1.0 / 362880.0 + r * (1.0 / 3628800.0);
  const double c1011 = 1.0 / 39916800.0 + r * (1.0 / 479001600.0);
  const double c12 = 1.0 / 6227020800.0;
  const double low = (c01 + r2 * c23) + r4 * (c45 + r2 * c67);
  const double high = (c89 + r2 * c1011) + r4 * c12;
  const double p = r * (low + r8 * high);
  const double e = two_to_k * p + (two_to_k - 1.0);
  const float t = static_cast<float>(e / (e + 2.0));
  const float signed_t = __builtin_copysignf(t, x);
  return __builtin_isnan(x) ? x : signed_t;
}

// dst[0, n) = amplitude * tanh(scale * src), as fake_quantize_row: read straight from a row
// (one_bit lookups of dim 16: 0.53x of float32 ones, now 0.66x).
void hashnet_forward_row(const float* src, float* dst, int n, float scale, float amplitude) {
  MTHT_NO_LOOP_CARRIED_DEPENDENCE
  for (int i = 0; i < n; ++i) dst[i] = amplitude * tanh_f32(scale * src[i]);
}
#undef MTHT_NO_LOOP_CARRIED_DEPENDENCE

// out[0, n) = g * (amplitude * scale * (1 - y^2)), y = tanh(scale * w). 1 - y^2 is rounded
// once, as Monolith's fused multiply-add rounds it: y^2 is exact in double, and for |y| <= 1
// 1 - y^2 rounded from double is the fused result (checked for every float in [-1, 1]).
void hashnet_backward_row(const float* __restrict w, const float* __restrict g, float* __restrict out, int n,
                          float scale, float amplitude) {
  const float factor = amplitude * scale;
  for (int i = 0; i < n; ++i) {
    const double y = tanh_f32(scale * w[i]);
    const float one_minus_square = static_cast<float>(1.0 - y * y);
    out[i] = g[i] * (factor * one_minus_square);
  }
}

#define MTHT_NARROW_STEP(name)                                                                                \
  template <int F, int D>                                                                                     \
  inline void name##_narrow_at(const SegmentSpec& s, uint16_t* h, float* st, const float* g, float lr,      \
                               int64_t t, uint32_t key) {                                                    \
    float w[D];                                                                                               \
    widen_format<F>(h, w, D);                                                                                 \
    name<D>(s, w, st, g, lr, t);                                                                              \
    narrow_format_stochastic<F>(w, h, D, key);                                                                \
  }                                                                                                           \
  template <int F>                                                                                            \
  bool name##_narrow(const SegmentSpec& s, uint16_t* h, float* st, const float* g, float lr, int64_t t,     \
                     uint32_t key) {                                                                          \
    switch (s.dim) {                                                                                          \
      case 8: name##_narrow_at<F, 8>(s, h, st, g, lr, t, key); return true;                                  \
      case 16: name##_narrow_at<F, 16>(s, h, st, g, lr, t, key); return true;                                \
      case 32: name##_narrow_at<F, 32>(s, h, st, g, lr, t, key); return true;                                \
      case 64: name##_narrow_at<F, 64>(s, h, st, g, lr, t, key); return true;                                \
      default: return false;                                                                                  \
    }                                                                                                         \
  }

MTHT_NARROW_STEP(sgd)
MTHT_NARROW_STEP(adagrad)
MTHT_NARROW_STEP(dynamic_wd_adagrad)
MTHT_NARROW_STEP(adadelta)
MTHT_NARROW_STEP(adam)
MTHT_NARROW_STEP(amsgrad)
MTHT_NARROW_STEP(ftrl)
MTHT_NARROW_STEP(group_ftrl)
MTHT_NARROW_STEP(group_adagrad)
MTHT_NARROW_STEP(momentum)
MTHT_NARROW_STEP(moving_average)
MTHT_NARROW_STEP(rmsprop)
MTHT_NARROW_STEP(rmspropv2)
#undef MTHT_NARROW_STEP

// The kernel table, indexed by OptKind.
inline KernelSet make_kernel_set(const char* name) {
  KernelSet k{};
  k.name = name;
  k.all_finite = all_finite;
  k.widen[0] = widen_float16;
  k.widen[1] = widen_bfloat16;
  k.narrow[0] = narrow_float16;
  k.narrow[1] = narrow_bfloat16;
  k.narrow_stochastic[0] = narrow_float16_stochastic;
  k.narrow_stochastic[1] = narrow_bfloat16_stochastic;
  k.fake_quantize_row = fake_quantize_row;
  k.hashnet_forward_row = hashnet_forward_row;
  k.hashnet_backward_row = hashnet_backward_row;
#define MTHT_SET_NARROW_STEP(kind, name)                                  \
  k.narrow_step[static_cast<int>(OptKind::kind)][0] = name##_narrow<0>; \
  k.narrow_step[static_cast<int>(OptKind::kind)][1] = name##_narrow<1>;
  MTHT_SET_NARROW_STEP(kSgd, sgd)
  MTHT_SET_NARROW_STEP(kAdagrad, adagrad)
  MTHT_SET_NARROW_STEP(kDynamicWdAdagrad, dynamic_wd_adagrad)
  MTHT_SET_NARROW_STEP(kAdadelta, adadelta)
  MTHT_SET_NARROW_STEP(kAdam, adam)
  MTHT_SET_NARROW_STEP(kAmsgrad, amsgrad)
  MTHT_SET_NARROW_STEP(kFtrl, ftrl)
  MTHT_SET_NARROW_STEP(kGroupFtrl, group_ftrl)
  MTHT_SET_NARROW_STEP(kGroupAdagrad, group_adagrad)
  MTHT_SET_NARROW_STEP(kMomentum, momentum)
  MTHT_SET_NARROW_STEP(kMovingAverage, moving_average)
  MTHT_SET_NARROW_STEP(kRmsprop, rmsprop)
  MTHT_SET_NARROW_STEP(kRmspropV2, rmspropv2)
#undef MTHT_SET_NARROW_STEP
  k.step[static_cast<int>(OptKind::kSgd)] = sgd_any;
  k.step[static_cast<int>(OptKind::kAdagrad)] = adagrad_any;
  k.step[static_cast<int>(OptKind::kDynamicWdAdagrad)] = dynamic_wd_adagrad_any;
  k.step[static_cast<int>(OptKind::kAdadelta)] = adadelta_any;
  k.step[static_cast<int>(OptKind::kAdam)] = adam_any;
  k.step[static_cast<int>(OptKind::kAmsgrad)] = amsgrad_any;
  k.step[static_cast<int>(OptKind::kFtrl)] = ftrl_any;
  k.step[static_cast<int>(OptKind::kGroupFtrl)] = group_ftrl_any;
  k.step[static_cast<int>(OptKind::kGroupAdagrad)] = group_adagrad_any;
  k.step[static_cast<int>(OptKind::kMomentum)] = momentum_any;
  k.step[static_cast<int>(OptKind::kMovingAverage)] = moving_average_any;
  k.step[static_cast<int>(OptKind::kRmsprop)] = rmsprop_any;
  k.step[static_cast<int>(OptKind::kRmspropV2)] = rmspropv2_any;
  k.step[static_cast<int>(OptKind::kBatchSoftmax)] = batch_softmax_any;
  return k;
}
