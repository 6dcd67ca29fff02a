// vpipe's float8 (e4m3) compute around cuBLASLt's float8 matrix product:
// - quantize_rows: each row's scale (its largest |x| over 448, at least 1e-12) and the row in
//   e4m3 over it (per-token activation scales, per-channel weight scales), one block per row:
//   the row is read from memory once, its second reading from the cache.
// - row_absmax: the largest |x| of each row (for one scale over a whole tensor), one block per
//   row.
// - quantize_fp8: x8 = e4m3(clamp(x / scale, ±448)), one scale per row (or one for all).
// - Both take x less an offset per channel where `offsets` is given: element i loses
//   offsets[(i / span) * inner + i % inner] (attention's keys and values less their mean over
//   the keys; see add_offsets).
// - add_offsets: y += offsets[(i / span) * inner + i % inner] in place (the values' mean back
//   on the attention's output).
// - scale_bias_act: y = act(y · row_scale · column_scale + bias) in place on the product's
//   output; f32 arithmetic, act = identity or GELU(tanh).
#include <cuda_fp8.h>

#include "common.cuh"

#define FP8_MAX 448.f
#define MIN_SCALE 1e-12f

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T>
__device__ void quantize_rows(const T* x, float* scales, __nv_fp8_e4m3* y, int cols) {
  __shared__ float partial[32];
  long long start = (long long)blockIdx.x * cols;
  const T* xr = x + start;
  float m = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, fabsf(to_f32(xr[c])));
  m = block_reduce(m, partial, Max());
  // As the CPU computes it: the largest value times 1/448 (no fused rounding: the add is 0).
  float s = fmaxf(m * (1.f / FP8_MAX), MIN_SCALE);
  if (threadIdx.x == 0) scales[blockIdx.x] = s;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float v = to_f32(xr[c]) / s;
    y[start + c] = __nv_fp8_e4m3(fminf(fmaxf(v, -FP8_MAX), FP8_MAX));
  }
}

// The offset of element i (0 without offsets).
__device__ __forceinline__ float offset_at(const float* offsets, long long inner, long long span,
                                           long long i) {
  return offsets ? offsets[(i / span) * inner + i % inner] : 0.f;
}

template <typename T>
__device__ void row_absmax(const T* x, const float* offsets, long long inner, long long span,
                           float* out, int cols) {
  __shared__ float partial[32];
  long long start = (long long)blockIdx.x * cols;
  float m = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    m = fmaxf(m, fabsf(to_f32(x[start + c]) - offset_at(offsets, inner, span, start + c)));
  // Zero stands for the lanes past the last warp: every |x| is at least that.
  m = block_reduce(m, partial, Max());
  if (threadIdx.x == 0) out[blockIdx.x] = m;
}

template <typename T>
__device__ void quantize_fp8(const T* x, const float* scales, int scale_stride,
                             const float* offsets, long long inner, long long span,
                             __nv_fp8_e4m3* y, long long n, int cols) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = (to_f32(x[i]) - offset_at(offsets, inner, span, i)) / scales[(i / cols) * scale_stride];
  y[i] = __nv_fp8_e4m3(fminf(fmaxf(v, -FP8_MAX), FP8_MAX));
}

template <typename T>
__device__ void add_offsets(T* y, const float* offsets, long long inner, long long span,
                            long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = from_f32<T>(to_f32(y[i]) + offset_at(offsets, inner, span, i));
}

template <typename T>
__device__ void scale_bias_act(T* y, const float* row_scales, const float* column_scales,
                               int column_stride, const T* bias, long long n, int cols,
                               int gelu) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int c = i % cols;
  float v = to_f32(y[i]) * row_scales[i / cols] * column_scales[c * column_stride];
  if (bias) v += to_f32(bias[c]);
  if (gelu) v = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  y[i] = from_f32<T>(v);
}

#define FP8_KERNELS(SUFFIX, T)                                                                 \
  extern "C" __global__ void quantize_rows_##SUFFIX(const T* x, float* scales,                \
                                                    __nv_fp8_e4m3* y, int cols) {             \
    quantize_rows<T>(x, scales, y, cols);                                                      \
  }                                                                                            \
  extern "C" __global__ void row_absmax_##SUFFIX(const T* x, const float* offsets,            \
                                                 long long inner, long long span, float* out, \
                                                 int cols) {                                  \
    row_absmax<T>(x, offsets, inner, span, out, cols);                                         \
  }                                                                                            \
  extern "C" __global__ void quantize_fp8_##SUFFIX(                                           \
      const T* x, const float* scales, int scale_stride, const float* offsets,                 \
      long long inner, long long span, __nv_fp8_e4m3* y, long long n, int cols) {              \
    quantize_fp8<T>(x, scales, scale_stride, offsets, inner, span, y, n, cols);                \
  }                                                                                            \
  extern "C" __global__ void add_offsets_##SUFFIX(T* y, const float* offsets, long long inner, \
                                                  long long span, long long n) {              \
    add_offsets<T>(y, offsets, inner, span, n);                                                \
  }                                                                                            \
  extern "C" __global__ void scale_bias_act_##SUFFIX(                                         \
      T* y, const float* row_scales, const float* column_scales, int column_stride,           \
      const T* bias, long long n, int cols, int gelu) {                                        \
    scale_bias_act<T>(y, row_scales, column_scales, column_stride, bias, n, cols, gelu);      \
  }
FP8_KERNELS(f32, float)
FP8_KERNELS(bf16, __nv_bfloat16)
FP8_KERNELS(f16, __half)
