// Element-wise work of a Wan DiT block, fused so that each step reads and writes the token
// tensor once instead of going through f32 copies (the reference computes these steps in f32
// and rounds once at the end; so do these kernels).
//
// - ln_modulate: y = LN(x) * mul[b] + add[b]; LN without affine, f32 statistics, one block
//   per row. mul/add are f32 [batches, dim] with a batch stride (0: one vector for all rows).
// - gated_residual: y = x + r * gate[b], in f32; for 16-bit rows of a multiple of eight, one
//   block per row, eight elements a thread (gated_residual_rows_x8).
// - rope_heads: [B, L, H, D] -> [B, H, L, D] with interleaved pairs rotated by cos/sin [L, D/2].
// - bias_act: y = act(y + bias) in place on a fresh matmul output, act = identity or
//   GELU(tanh); f32 arithmetic.
// - dequant_fp8: w = float(w8) * scale (ComfyUI's scaled fp8 weights); candle 0.11.1's own
//   float8 casts on CUDA look up kernels under names the kernel file does not define.
#include <cuda_fp8.h>

#include "common.cuh"

struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float v, float* shared) { return block_reduce(v, shared, Add()); }

template <typename T>
__device__ void ln_modulate(const T* x, const float* mul, const float* add, T* y, int dim,
                            long long rows_per_batch, long long mod_stride, float eps) {
  extern __shared__ float row[];
  __shared__ float partial[32];
  long long r = blockIdx.x;
  const T* xr = x + r * dim;
  float sum = 0.f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float v = to_f32(xr[c]);
    row[c] = v;
    sum += v;
  }
  float mean = block_sum(sum, partial) / dim;
  float sq = 0.f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float d = row[c] - mean;
    sq += d * d;
  }
  float rstd = rsqrtf(block_sum(sq, partial) / dim + eps);
  long long b = r / rows_per_batch;
  const float* m = mul + b * mod_stride;
  const float* a = add + b * mod_stride;
  T* yr = y + r * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    yr[c] = from_f32<T>((row[c] - mean) * rstd * m[c] + a[c]);
  }
}

template <typename T>
__device__ void gated_residual(const T* x, const T* res, const float* gate, T* y, long long n,
                               int dim, long long rows_per_batch) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  long long row = i / dim;
  int c = i - row * dim;
  float g = gate[(row / rows_per_batch) * dim + c];
  y[i] = from_f32<T>(to_f32(x[i]) + to_f32(res[i]) * g);
}

// gated_residual over one row per block, VEC elements a thread (dim a multiple of VEC, rows
// aligned to VEC elements): the gate's row is found once per block rather than by two 64-bit
// divisions per element.
template <typename T, int VEC>
__device__ void gated_residual_rows(const T* x, const T* res, const float* gate, T* y, int dim,
                                    long long rows_per_batch) {
  long long r = blockIdx.x;
  const float* g = gate + (r / rows_per_batch) * dim;
  long long start = r * dim;
  for (int c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float xv[VEC], rv[VEC];
    Vec<T, VEC>::load(x + start + c, xv);
    Vec<T, VEC>::load(res + start + c, rv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] += rv[j] * g[c + j];
    Vec<T, VEC>::store(y + start + c, xv);
  }
}

template <typename T>
__device__ void rope_heads(const T* x, const float* cos, const float* sin, T* y, int batches,
                           int tokens, int heads, int head_dim) {
  int pairs = head_dim / 2;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long n = (long long)batches * tokens * heads * pairs;
  if (i >= n) return;
  int p = i % pairs;
  long long rest = i / pairs;
  int h = rest % heads;
  rest /= heads;
  int l = rest % tokens;
  int b = rest / tokens;
  long long src = (((long long)b * tokens + l) * heads + h) * head_dim + 2 * p;
  long long dst = (((long long)b * heads + h) * tokens + l) * head_dim + 2 * p;
  float x1 = to_f32(x[src]), x2 = to_f32(x[src + 1]);
  float c = cos[(long long)l * pairs + p], s = sin[(long long)l * pairs + p];
  y[dst] = from_f32<T>(x1 * c - x2 * s);
  y[dst + 1] = from_f32<T>(x1 * s + x2 * c);
}

template <typename T>
__device__ void bias_act(T* y, const T* bias, long long n, int dim, int gelu) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = to_f32(y[i]) + to_f32(bias[i % dim]);
  if (gelu) v = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  y[i] = from_f32<T>(v);
}

#define DIT_ROW_KERNELS(SUFFIX, T)                                                             \
  extern "C" __global__ void gated_residual_rows_x8_##SUFFIX(                                 \
      const T* x, const T* res, const float* gate, T* y, int dim, long long rows_per_batch) {  \
    gated_residual_rows<T, 8>(x, res, gate, y, dim, rows_per_batch);                           \
  }
DIT_ROW_KERNELS(bf16, __nv_bfloat16)
DIT_ROW_KERNELS(f16, __half)

#define DIT_KERNELS(SUFFIX, T)                                                                 \
  extern "C" __global__ void ln_modulate_##SUFFIX(const T* x, const float* mul,               \
                                                  const float* add, T* y, int dim,            \
                                                  long long rows_per_batch,                   \
                                                  long long mod_stride, float eps) {          \
    ln_modulate<T>(x, mul, add, y, dim, rows_per_batch, mod_stride, eps);                     \
  }                                                                                            \
  extern "C" __global__ void gated_residual_##SUFFIX(const T* x, const T* res,                \
                                                     const float* gate, T* y, long long n,    \
                                                     int dim, long long rows_per_batch) {     \
    gated_residual<T>(x, res, gate, y, n, dim, rows_per_batch);                               \
  }                                                                                            \
  extern "C" __global__ void rope_heads_##SUFFIX(const T* x, const float* cos,                \
                                                 const float* sin, T* y, int batches,         \
                                                 int tokens, int heads, int head_dim) {       \
    rope_heads<T>(x, cos, sin, y, batches, tokens, heads, head_dim);                          \
  }                                                                                            \
  extern "C" __global__ void bias_act_##SUFFIX(T* y, const T* bias, long long n, int dim,     \
                                               int gelu) {                                    \
    bias_act<T>(y, bias, n, dim, gelu);                                                       \
  }                                                                                            \
  extern "C" __global__ void dequant_fp8_##SUFFIX(const __nv_fp8_e4m3* w, const float* scale, \
                                                  T* y, long long n) {                        \
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                            \
    if (i < n) y[i] = from_f32<T>(float(w[i]) * scale[0]);                                     \
  }
DIT_KERNELS(f32, float)
DIT_KERNELS(bf16, __nv_bfloat16)
DIT_KERNELS(f16, __half)
