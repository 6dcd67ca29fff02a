// Element-wise work of a Wan DiT block, fused so that each step reads and writes the token
// tensor once instead of going through f32 copies (the reference computes these steps in f32
// and rounds once at the end; so do these kernels).
//
// - ln_modulate: y = LN(x) * mul[b] + add[b]; LN without affine, f32 statistics, one block
//   per row. mul/add are f32 [batches, dim] with a batch stride (0: one vector for all rows).
//   For 16-bit rows of a multiple of eight, eight elements a thread (ln_modulate_rows_x8),
//   which can instead give its output quantised to e4m3 per row, for a float8 product; rows
//   of up to 8 192 held in registers, up to eight groups of eight a thread in small blocks
//   (ln_modulate_rows_held1..8), the same outputs.
// - gated_residual_rows: y = x + r * gate[b], in f32, one block per row (a null gate gives
//   the plain residual y = x + r); for 16-bit rows of a multiple of eight, eight elements a
//   thread (gated_residual_rows_x8).
// - rope_heads: [B, L, H, D] -> [B, H, L, D] with interleaved pairs rotated by cos/sin [L, D/2].
// - rms_rope_heads: the q/k RMS norm across the heads (rounded once, as candle's rms_norm)
//   and rope_heads in one pass, one block per token, eight elements a thread.
// - bias_act: y = act(y + bias) in place on a fresh matmul output, act = identity or
//   GELU(tanh); f32 arithmetic.
// - dequant_fp8: w = float(w8) * scale (ComfyUI's scaled fp8 weights); candle 0.11.1's own
//   float8 casts on CUDA look up kernels under names the kernel file does not define.
// - dequant_rows_mean_x8: the float8 attention's output back, y = float(o8) * scale +
//   mean[b] (the values' mean over the keys, taken off before the attention), one block per
//   token row, eight elements a thread: the dequantisation and the mean in one pass; or,
//   instead, that row quantised per row for the output projection's float8 product.
#include "common.cuh"

struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float v, float* shared) { return block_reduce(v, shared, Add()); }

// VEC f32 values to and from shared memory, as 16-byte words where VEC is a multiple of 4
// (p then aligned).
template <int VEC>
__device__ __forceinline__ void store_shared(float* p, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4)
      *reinterpret_cast<float4*>(p + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = v[j];
  }
}
template <int VEC>
__device__ __forceinline__ void load_shared(const float* p, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      float4 w = *reinterpret_cast<const float4*>(p + j);
      v[j] = w.x, v[j + 1] = w.y, v[j + 2] = w.z, v[j + 3] = w.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = p[j];
  }
}

// y = LN(x) * mul[b] + add[b] over one row per block, VEC elements a thread (VEC 1, or 4 or 8
// 16-bit elements: dim a multiple of VEC, rows aligned to VEC elements), the row kept in
// shared memory (dim floats) between its passes. With y8, y is not written: the values are
// quantised per row for a float8 product (store_row), from f32; blocks at or past `rows`
// write a padding row (zero_fp8_row) and read nothing.
template <typename T, int VEC>
__device__ void ln_modulate_rows(const T* x, const float* mul, const float* add, T* y, int dim,
                                 long long rows_per_batch, long long mod_stride, float eps,
                                 __nv_fp8_e4m3* y8, float* y8_scales, long long rows) {
  extern __shared__ float row[];
  __shared__ float partial[32];
  long long r = blockIdx.x;
  if (fp8_padding_row<VEC>(y8, y8_scales, r, rows, dim)) return;
  const T* xr = x + r * dim;
  float sum = 0.f;
  for (int c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC];
    Vec<T, VEC>::load(xr + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += v[j];
    store_shared<VEC>(row + c, v);
  }
  float mean = block_sum(sum, partial) / dim;
  float sq = 0.f;
  for (int c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC];
    load_shared<VEC>(row + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float d = v[j] - mean;
      sq += d * d;
    }
  }
  float rstd = rsqrtf(block_sum(sq, partial) / dim + eps);
  long long b = r / rows_per_batch;
  const float* m = mul + b * mod_stride;
  const float* a = add + b * mod_stride;
  // The row's values from column c, in f32 (mul and add 16-byte aligned where VEC is 8).
  auto values = [&](int c, float(&v)[VEC]) {
    float mv[VEC], av[VEC];
    load_shared<VEC>(row + c, v);
    load_f32<VEC>(m + c, mv);
    load_f32<VEC>(a + c, av);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean) * rstd * mv[j] + av[j];
  };
  store_row_at<T, VEC>(values, y, y8, y8_scales, r, dim, partial);
}

// ln_modulate_rows (eight 16-bit elements a group) with the row held in registers, GROUPS
// groups a thread (dim at most GROUPS · 8 · blockDim.x; blocks of at most 128 threads): several
// rows in flight on each multiprocessor where the shared-memory kernel's blocks of dim / 8
// threads left two, and the modulation read once per element.
template <typename T, int GROUPS>
__device__ void ln_modulate_rows_held(const T* x, const float* mul, const float* add, T* y,
                                      int dim, long long rows_per_batch, long long mod_stride,
                                      float eps, __nv_fp8_e4m3* y8, float* y8_scales,
                                      long long rows) {
  constexpr int VEC = 8;
  __shared__ float partial[32];
  long long r = blockIdx.x;
  if (fp8_padding_row<VEC>(y8, y8_scales, r, rows, dim)) return;
  const T* xr = x + r * dim;
  float v[GROUPS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    int c = (g * blockDim.x + threadIdx.x) * VEC;
    if (c < dim) {
      Vec<T, VEC>::load(xr + c, v[g]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[g][j];
    }
  }
  float mean = block_sum(sum, partial) / dim;
  float sq = 0.f;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    if ((g * blockDim.x + threadIdx.x) * VEC < dim) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float d = v[g][j] - mean;
        sq += d * d;
      }
    }
  }
  float rstd = rsqrtf(block_sum(sq, partial) / dim + eps);
  long long b = r / rows_per_batch;
  const float* m = mul + b * mod_stride;
  const float* a = add + b * mod_stride;
  float largest = 0.f;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    int c = (g * blockDim.x + threadIdx.x) * VEC;
    if (c < dim) {
      float mv[VEC], av[VEC];
      load_f32<VEC>(m + c, mv);
      load_f32<VEC>(a + c, av);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[g][j] = (v[g][j] - mean) * rstd * mv[j] + av[j];
        largest = fmaxf(largest, fabsf(v[g][j]));
      }
    }
  }
  if (!y8) {
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) {
      int c = (g * blockDim.x + threadIdx.x) * VEC;
      if (c < dim) Vec<T, VEC>::store(y + r * dim + c, v[g]);
    }
    return;
  }
  float s = fp8_row_scale(largest, partial, y8_scales + r);
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    int c = (g * blockDim.x + threadIdx.x) * VEC;
    if (c < dim) store_fp8<VEC>(y8 + r * dim + c, v[g], s);
  }
}

// y = x + r * gate[b] over one row per block, VEC elements a thread (VEC 1, or 8 16-bit
// elements: dim a multiple of VEC, rows aligned to VEC elements), the gate's row found once
// per block. A null gate adds r as it is (x + r · 1 is exact before the rounding).
template <typename T, int VEC>
__device__ void gated_residual_rows(const T* x, const T* res, const float* gate, T* y, int dim,
                                    long long rows_per_batch) {
  long long r = blockIdx.x;
  const float* g = gate ? gate + (r / rows_per_batch) * dim : nullptr;
  long long start = r * dim;
  for (int c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float xv[VEC], rv[VEC], gv[VEC];
    Vec<T, VEC>::load(x + start + c, xv);
    Vec<T, VEC>::load(res + start + c, rv);
    if (g) {
      load_f32<VEC>(g + c, gv);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) gv[j] = 1.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] += rv[j] * gv[j];
    Vec<T, VEC>::store(y + start + c, xv);
  }
}

// y[b, h, l, :] = rope(round(x[b, l, :] * rstd * w)) for the token r = b * tokens + l of this
// block: the RMS over all heads in f32, the normed value rounded once to T (as candle's
// rms_norm), then each interleaved pair rotated by cos/sin[l, pair] in f32 and rounded. VEC
// elements a thread (head_dim a multiple of VEC, rows aligned to VEC elements); the row is
// read twice, the second time from the cache.
template <typename T, int VEC>
__device__ void rms_rope_heads(const T* x, const T* weight, const float* cos, const float* sin,
                               T* y, int tokens, int heads, int head_dim, float eps) {
  __shared__ float partial[32];
  long long r = blockIdx.x;
  int dim = heads * head_dim;
  const T* xr = x + r * dim;
  float sq = 0.f;
  for (int c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC];
    Vec<T, VEC>::load(xr + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sq += v[j] * v[j];
  }
  float rstd = rsqrtf(block_sum(sq, partial) / dim + eps);
  long long b = r / tokens;
  int l = r - b * tokens, pairs = head_dim / 2;
  const float* cr = cos + (long long)l * pairs;
  const float* sr = sin + (long long)l * pairs;
  for (int c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC], w[VEC];
    Vec<T, VEC>::load(xr + c, v);
    Vec<T, VEC>::load(weight + c, w);
    int h = c / head_dim, d = c - h * head_dim;
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      float x1 = to_f32(from_f32<T>(rstd * v[j] * w[j]));
      float x2 = to_f32(from_f32<T>(rstd * v[j + 1] * w[j + 1]));
      float cs = cr[(d + j) / 2], sn = sr[(d + j) / 2];
      v[j] = x1 * cs - x2 * sn;
      v[j + 1] = x1 * sn + x2 * cs;
    }
    Vec<T, VEC>::store(y + ((b * heads + h) * tokens + l) * head_dim + d, v);
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

// The float8 attention's output row of this block, float(o8) * scale[0] + mean[b] in f32,
// stored to y or, with y8, quantised per row for the output projection's float8 product
// (store_row); blocks at or past `rows` then write a padding row (zero_fp8_row).
template <typename T, int VEC>
__device__ void dequant_rows_mean(const __nv_fp8_e4m3* o8, const float* scale, const float* mean,
                                  T* y, int dim, long long rows_per_batch, __nv_fp8_e4m3* y8,
                                  float* y8_scales, long long rows) {
  __shared__ float partial[32];
  long long r = blockIdx.x;
  if (fp8_padding_row<VEC>(y8, y8_scales, r, rows, dim)) return;
  const __nv_fp8_e4m3* src = o8 + r * dim;
  const float* m = mean + (r / rows_per_batch) * dim;
  float s = scale[0];
  auto values = [&](int c, float(&v)[VEC]) {
    typename Word8<VEC>::type word = *reinterpret_cast<const typename Word8<VEC>::type*>(src + c);
    const __nv_fp8_e4m3* bytes = reinterpret_cast<const __nv_fp8_e4m3*>(&word);
    float mv[VEC];
    load_f32<VEC>(m + c, mv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = float(bytes[j]) * s + mv[j];
  };
  store_row_at<T, VEC>(values, y, y8, y8_scales, r, dim, partial);
}

#define LN_MODULATE_HELD(SUFFIX, T, GROUPS)                                                    \
  extern "C" __global__ void __launch_bounds__(128) ln_modulate_rows_held##GROUPS##_##SUFFIX(  \
      const T* x, const float* mul, const float* add, T* y, int dim, long long rows_per_batch, \
      long long mod_stride, float eps, __nv_fp8_e4m3* y8, float* y8_scales, long long rows) {  \
    ln_modulate_rows_held<T, GROUPS>(x, mul, add, y, dim, rows_per_batch, mod_stride, eps, y8, \
                                     y8_scales, rows);                                         \
  }
#define LN_MODULATE_HELD_ALL(SUFFIX, T)                                                        \
  LN_MODULATE_HELD(SUFFIX, T, 1)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 2)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 3)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 4)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 5)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 6)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 7)                                                               \
  LN_MODULATE_HELD(SUFFIX, T, 8)
LN_MODULATE_HELD_ALL(bf16, __nv_bfloat16)
LN_MODULATE_HELD_ALL(f16, __half)

#define DIT_ROW_KERNELS(SUFFIX, T)                                                             \
  extern "C" __global__ void ln_modulate_rows_x8_##SUFFIX(                                    \
      const T* x, const float* mul, const float* add, T* y, int dim, long long rows_per_batch, \
      long long mod_stride, float eps, __nv_fp8_e4m3* y8, float* y8_scales, long long rows) {  \
    ln_modulate_rows<T, 8>(x, mul, add, y, dim, rows_per_batch, mod_stride, eps, y8,           \
                           y8_scales, rows);                                                   \
  }                                                                                            \
  extern "C" __global__ void gated_residual_rows_x8_##SUFFIX(                                 \
      const T* x, const T* res, const float* gate, T* y, int dim, long long rows_per_batch) {  \
    gated_residual_rows<T, 8>(x, res, gate, y, dim, rows_per_batch);                           \
  }                                                                                            \
  extern "C" __global__ void rms_rope_heads_x8_##SUFFIX(                                      \
      const T* x, const T* weight, const float* cos, const float* sin, T* y, int tokens,       \
      int heads, int head_dim, float eps) {                                                    \
    rms_rope_heads<T, 8>(x, weight, cos, sin, y, tokens, heads, head_dim, eps);                \
  }                                                                                            \
  extern "C" __global__ void dequant_rows_mean_x8_##SUFFIX(                                   \
      const __nv_fp8_e4m3* o8, const float* scale, const float* mean, T* y, int dim,           \
      long long rows_per_batch, __nv_fp8_e4m3* y8, float* y8_scales, long long rows) {         \
    dequant_rows_mean<T, 8>(o8, scale, mean, y, dim, rows_per_batch, y8, y8_scales, rows);     \
  }
DIT_ROW_KERNELS(bf16, __nv_bfloat16)
DIT_ROW_KERNELS(f16, __half)

#define DIT_KERNELS(SUFFIX, T)                                                                 \
  extern "C" __global__ void ln_modulate_##SUFFIX(const T* x, const float* mul,               \
                                                  const float* add, T* y, int dim,            \
                                                  long long rows_per_batch,                   \
                                                  long long mod_stride, float eps) {          \
    ln_modulate_rows<T, 1>(x, mul, add, y, dim, rows_per_batch, mod_stride, eps, nullptr,      \
                           nullptr, 0);                                                        \
  }                                                                                            \
  extern "C" __global__ void gated_residual_rows_##SUFFIX(const T* x, const T* res,           \
                                                          const float* gate, T* y, int dim,   \
                                                          long long rows_per_batch) {         \
    gated_residual_rows<T, 1>(x, res, gate, y, dim, rows_per_batch);                          \
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
