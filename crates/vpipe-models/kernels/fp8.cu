// vpipe's float8 (e4m3) compute around cuBLASLt's float8 matrix product:
// - quantize_rows: each row's scale (its largest |x| over 448, at least 1e-12) and the row in
//   e4m3 over it (per-token activation scales, per-channel weight scales), one block per row:
//   the row is read from memory once, its second reading from the cache.
// - absmax_all: the largest |x| of a whole tensor (for one scale over it), grid-stride, four
//   16-bit elements a thread where aligned.
// - quantize_fp8: x8 = e4m3(clamp(x / scale, ±448)), one scale per row (or one for all).
// - Both take x less an offset per channel where `offsets` is given: element i loses
//   offsets[(i / span) * inner + i % inner] (attention's keys and values less their mean over
//   the keys; see add_offsets).
// - add_offsets: y += offsets[(i / span) * inner + i % inner] in place (the values' mean back
//   on the attention's output).
// - scale_bias_act: y = act(y · factor · row_scale · column_scale + bias) in place on the
//   product's output; f32 arithmetic, act = identity or GELU(tanh).
// - rows_scale_act: one block per row, eight 16-bit elements a thread: v = act(x · factor ·
//   row_scale · column_scale + bias), then either written to y (in place or not) or quantised
//   as quantize_rows does, the row's scale with it (the float8 product's own scales and
//   epilogue in one pass, its output ready for the next product; or quantize_rows alone).
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

// The first of the offsets of VEC elements from element i (null without offsets): a group of
// VEC lies within one block of offsets, `inner` being a multiple of VEC.
__device__ __forceinline__ const float* group_offsets(const float* offsets, long long inner,
                                                      long long span, long long i) {
  return offsets ? offsets + (i / span) * inner + i % inner : nullptr;
}

// The largest |x - offset| over all n elements into *out (holding 0 before): VEC elements a
// thread at a time, grid-stride, one atomic max per block (non-negative floats order as their
// bits do).
template <typename T, int VEC>
__device__ void absmax_all(const T* x, const float* offsets, long long inner, long long span,
                           float* out, long long n) {
  __shared__ float partial[32];
  float m = 0.f;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
       i += (long long)gridDim.x * blockDim.x * VEC) {
    float v[VEC];
    Vec<T, VEC>::load(x + i, v);
    const float* off = group_offsets(offsets, inner, span, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = fmaxf(m, fabsf(v[j] - (off ? off[j] : 0.f)));
  }
  m = block_reduce(m, partial, Max());
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

// quantize_fp8 with VEC elements a thread (of one row: cols a multiple of VEC), one division
// for the group's offsets and the float8 bytes stored as one word.
template <typename T, int VEC>
__device__ void quantize_fp8_groups(const T* x, const float* scales, int scale_stride,
                                    const float* offsets, long long inner, long long span,
                                    __nv_fp8_e4m3* y, long long n, int cols) {
  long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  float v[VEC];
  Vec<T, VEC>::load(x + i, v);
  const float* off = group_offsets(offsets, inner, span, i);
  float s = scales[scale_stride ? i / cols : 0];
  unsigned int packed = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float q = (v[j] - (off ? off[j] : 0.f)) / s;
    packed |= (unsigned int)__nv_fp8_e4m3(fminf(fmaxf(q, -FP8_MAX), FP8_MAX)).__x << (8 * j);
  }
  *reinterpret_cast<unsigned int*>(y + i) = packed;
}

// add_offsets with VEC elements a thread.
template <typename T, int VEC>
__device__ void add_offsets_groups(T* y, const float* offsets, long long inner, long long span,
                                   long long n) {
  long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  float v[VEC];
  Vec<T, VEC>::load(y + i, v);
  const float* off = group_offsets(offsets, inner, span, i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] += off[j];
  Vec<T, VEC>::store(y + i, v);
}

template <typename T>
__device__ void scale_bias_act(T* y, float factor, const float* row_scales,
                               const float* column_scales, int column_stride, const T* bias,
                               long long n, int cols, int gelu) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int c = i % cols;
  float v = to_f32(y[i]) * factor * row_scales[i / cols] * column_scales[c * column_stride];
  if (bias) v += to_f32(bias[c]);
  if (gelu) v = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  y[i] = from_f32<T>(v);
}

// v = act(x[r, c] · factor · row_scales[r] · column_scales[c · column_stride] + bias[c]) over
// one row r per block, VEC elements a thread (cols a multiple of VEC, rows aligned to VEC
// elements); a null row_scales, column_scales or bias is left out. Without y8, v goes to y
// (which may be x). With y8, the row's scale (its largest |v| over 448, at least MIN_SCALE)
// goes to y8_scales[r] and v over it, in e4m3, to y8; blocks at or past `rows` write a row of
// zeros with a zero scale (the padding cuBLASLt's tiles take) and read nothing. Quantising
// reads the row twice, the second time from the cache.
template <typename T, int VEC>
__device__ void rows_scale_act(const T* x, float factor, const float* row_scales,
                               const float* column_scales, int column_stride, const T* bias,
                               int gelu, T* y, __nv_fp8_e4m3* y8, float* y8_scales, int cols,
                               int rows) {
  __shared__ float partial[32];
  long long r = blockIdx.x;
  long long start = r * cols;
  if (r >= rows) {
    if (!y8) return;
    for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
      unsigned char zeros[VEC] = {};
      *reinterpret_cast<uint2*>(y8 + start + c) = *reinterpret_cast<const uint2*>(zeros);
    }
    if (threadIdx.x == 0) y8_scales[r] = 0.f;
    return;
  }
  float scale = factor * (row_scales ? row_scales[r] : 1.f);
  auto values = [&](int c, float(&v)[VEC]) {
    Vec<T, VEC>::load(x + start + c, v);
    float b[VEC];
    if (bias) Vec<T, VEC>::load(bias + c, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = scale * (column_scales ? column_scales[(c + j) * column_stride] : 1.f);
      float u = v[j] * s + (bias ? b[j] : 0.f);
      v[j] = gelu ? 0.5f * u * (1.f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)))
                  : u;
    }
  };
  if (!y8) {
    for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
      float v[VEC];
      values(c, v);
      Vec<T, VEC>::store(y + start + c, v);
    }
    return;
  }
  float m = 0.f;
  for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
    float v[VEC];
    values(c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = fmaxf(m, fabsf(v[j]));
  }
  m = block_reduce(m, partial, Max());
  float s = fmaxf(m * (1.f / FP8_MAX), MIN_SCALE);
  if (threadIdx.x == 0) y8_scales[r] = s;
  for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
    float v[VEC];
    values(c, v);
    unsigned char packed[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      packed[j] = __nv_fp8_e4m3(fminf(fmaxf(v[j] / s, -FP8_MAX), FP8_MAX)).__x;
    *reinterpret_cast<uint2*>(y8 + start + c) = *reinterpret_cast<const uint2*>(packed);
  }
}

#define FP8_KERNELS(SUFFIX, T)                                                                 \
  extern "C" __global__ void quantize_rows_##SUFFIX(const T* x, float* scales,                \
                                                    __nv_fp8_e4m3* y, int cols) {             \
    quantize_rows<T>(x, scales, y, cols);                                                      \
  }                                                                                            \
  extern "C" __global__ void absmax_all_##SUFFIX(const T* x, const float* offsets,            \
                                                 long long inner, long long span, float* out, \
                                                 long long n) {                               \
    absmax_all<T, 1>(x, offsets, inner, span, out, n);                                         \
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
      T* y, float factor, const float* row_scales, const float* column_scales,                 \
      int column_stride, const T* bias, long long n, int cols, int gelu) {                     \
    scale_bias_act<T>(y, factor, row_scales, column_scales, column_stride, bias, n, cols,     \
                      gelu);                                                                   \
  }
// Four 16-bit elements a thread (8-byte accesses; the caller checks the alignment).
#define FP8_GROUP_KERNELS(SUFFIX, T)                                                           \
  extern "C" __global__ void absmax_all_x4_##SUFFIX(const T* x, const float* offsets,         \
                                                    long long inner, long long span,          \
                                                    float* out, long long n) {                \
    absmax_all<T, 4>(x, offsets, inner, span, out, n);                                         \
  }                                                                                            \
  extern "C" __global__ void quantize_fp8_x4_##SUFFIX(                                        \
      const T* x, const float* scales, int scale_stride, const float* offsets,                 \
      long long inner, long long span, __nv_fp8_e4m3* y, long long n, int cols) {              \
    quantize_fp8_groups<T, 4>(x, scales, scale_stride, offsets, inner, span, y, n, cols);      \
  }                                                                                            \
  extern "C" __global__ void add_offsets_x4_##SUFFIX(T* y, const float* offsets,              \
                                                     long long inner, long long span,         \
                                                     long long n) {                           \
    add_offsets_groups<T, 4>(y, offsets, inner, span, n);                                      \
  }                                                                                            \
  extern "C" __global__ void rows_scale_act_x8_##SUFFIX(                                      \
      const T* x, float factor, const float* row_scales, const float* column_scales,           \
      int column_stride, const T* bias, int gelu, T* y, __nv_fp8_e4m3* y8, float* y8_scales,   \
      int cols, int rows) {                                                                    \
    rows_scale_act<T, 8>(x, factor, row_scales, column_scales, column_stride, bias, gelu, y,   \
                         y8, y8_scales, cols, rows);                                           \
  }
FP8_GROUP_KERNELS(bf16, __nv_bfloat16)
FP8_GROUP_KERNELS(f16, __half)
FP8_KERNELS(f32, float)
FP8_KERNELS(bf16, __nv_bfloat16)
FP8_KERNELS(f16, __half)
