// The kernel table type (no functions: included by the per-ISA kernel units).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mtht/spec_types.h"

namespace mtht {

using OptStepFn = void (*)(const SegmentSpec& s, float* w, float* state, const float* g, float lr, int64_t step);
using AllFiniteFn = bool (*)(const float* v, size_t n);
// Values kept in 16 bits (narrow_values_impl.h): [0] float16, [1] bfloat16.
using WidenFn = void (*)(const uint16_t* h, float* out, size_t n);
using NarrowFn = void (*)(const float* v, uint16_t* h, size_t n);
using NarrowStochasticFn = void (*)(const float* v, uint16_t* h, size_t n, uint32_t key);
// An optimizer step of a one-segment entry kept in 16 bits, rounded with the noise of `key`;
// false (nothing done) for a dim it has no loop for.
using NarrowStepFn = bool (*)(const SegmentSpec& s, uint16_t* h, float* st, const float* g, float lr, int64_t step,
                              uint32_t key);

// Retrievers of a row, from src[0, n) to dst[0, n) (the same array, or two that do not
// overlap): fixed_r8 (to multiples of r / 128); HashNet (amplitude * tanh(scale * v)) and
// its gradient (out = g * d/dw of that).
using FakeQuantizeRowFn = void (*)(const float* src, float* dst, int n, float r);
using HashnetForwardRowFn = void (*)(const float* src, float* dst, int n, float scale, float amplitude);
using HashnetBackwardRowFn = void (*)(const float* w, const float* g, float* out, int n, float scale,
                                      float amplitude);

struct KernelSet {
  const char* name;
  OptStepFn step[kNumOptKinds];
  AllFiniteFn all_finite;  // whether none of v[0, n) is NaN or Inf
  WidenFn widen[2];
  NarrowFn narrow[2];
  NarrowStochasticFn narrow_stochastic[2];
  FakeQuantizeRowFn fake_quantize_row;
  HashnetForwardRowFn hashnet_forward_row;
  HashnetBackwardRowFn hashnet_backward_row;
  NarrowStepFn narrow_step[kNumOptKinds][2];  // null for batch_softmax (the general path)
};

// Defined in the per-ISA translation units; a set is null where the build lacks it.
const KernelSet* scalar_kernel_set();
const KernelSet* baseline_kernel_set();  // SSE2 on x86-64, NEON on aarch64
const KernelSet* avx2_kernel_set();
const KernelSet* avx512_kernel_set();

}  // namespace mtht
