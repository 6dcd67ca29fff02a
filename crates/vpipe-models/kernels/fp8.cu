// vpipe's float8 (e4m3) compute around cuBLASLt's float8 matrix product:
// - quantize_rows: each row's scale (its largest |x| over 448, at least 1e-12) and the row in
//   e4m3 over it (per-token activation scales, per-channel weight scales), one block per row:
//   the row is read from memory once, its second reading from the cache.
// - absmax_all: the largest |x| of a whole tensor (for one scale over it), grid-stride, eight
//   (or four) 16-bit elements a thread where aligned; quantize_fp8 and add_offsets likewise.
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
// - channel_stats, channel_stats_merge: attention's keys or values, each channel's mean over
//   the keys and the largest |x - mean| of the whole tensor, from one pass over x.
#include "common.cuh"

template <typename T>
__device__ void quantize_rows(const T* x, float* scales, __nv_fp8_e4m3* y, int cols) {
  __shared__ float partial[32];
  long long start = (long long)blockIdx.x * cols;
  auto values = [&](int c, float(&v)[1]) { v[0] = to_f32(x[start + c]); };
  store_row<T, 1>(values, static_cast<T*>(nullptr), y + start, scales + blockIdx.x, cols,
                  partial);
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

// The offsets of the VEC elements from element i, in f32 (zeros without offsets): a group of
// VEC lies within one block of offsets, `inner` being a multiple of VEC, and the offsets are
// 16-byte aligned (so read as 16-byte words). The index in 32-bit arithmetic where it fits:
// a 64-bit division costs several times as much, and these kernels are bound by such work
// rather than by memory otherwise.
template <int VEC>
__device__ __forceinline__ void group_offsets(const float* offsets, long long inner,
                                              long long span, long long i, float (&o)[VEC]) {
  if (!offsets) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = 0.f;
    return;
  }
  long long at;
  if (i <= 0xffffffffLL && span <= 0xffffffffLL) {
    unsigned ii = (unsigned)i, sp = (unsigned)span, in = (unsigned)inner;
    at = (long long)(ii / sp) * inner + ii % in;
  } else {
    at = (i / span) * inner + i % inner;
  }
  load_f32<VEC>(offsets + at, o);
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
    float v[VEC], off[VEC];
    Vec<T, VEC>::load(x + i, v);
    group_offsets<VEC>(offsets, inner, span, i, off);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = fmaxf(m, fabsf(v[j] - off[j]));
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
  float v[VEC], off[VEC];
  Vec<T, VEC>::load(x + i, v);
  group_offsets<VEC>(offsets, inner, span, i, off);
  float s = scales[scale_stride ? i / cols : 0];
  unsigned char packed[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float q = (v[j] - off[j]) / s;
    packed[j] = __nv_fp8_e4m3(fminf(fmaxf(q, -FP8_MAX), FP8_MAX)).__x;
  }
  *reinterpret_cast<typename Word8<VEC>::type*>(y + i) =
      *reinterpret_cast<const typename Word8<VEC>::type*>(packed);
}

// add_offsets with VEC elements a thread.
template <typename T, int VEC>
__device__ void add_offsets_groups(T* y, const float* offsets, long long inner, long long span,
                                   long long n) {
  long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  float v[VEC], off[VEC];
  Vec<T, VEC>::load(y + i, v);
  group_offsets<VEC>(offsets, inner, span, i, off);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] += off[j];
  Vec<T, VEC>::store(y + i, v);
}

// Per-channel sum, least and largest value over a chunk of the rows of x laid out
// [outer, rows, inner] (inner contiguous: attention's [B, H, L, D] keys or values token-major,
// outer B and inner H·D, or head-major, outer B·H and inner D), VEC 16-bit elements a thread:
// block (chunk, o) writes its chunk's three values of each channel o·inner + c to
// partial[((p · chunks + chunk) · outer + o) · inner + c], p = 0, 1, 2 for sum, least,
// largest. A row of inner / VEC groups takes `groups` threads (looping where there are more
// groups than threads); blockDim / groups rows go at once, merged in shared memory
// (3 · blockDim · VEC floats) in a fixed order, so that the sums do not depend on timing.
template <typename T, int VEC>
__device__ void channel_stats(const T* x, float* partial, long long rows, int inner,
                              int rows_per_chunk) {
  extern __shared__ float merged[];
  int groups = inner / VEC;
  int lanes = max(1, (int)blockDim.x / groups);  // rows at once
  int lane = threadIdx.x / groups, g0 = threadIdx.x % groups;
  long long o = blockIdx.y, chunks = gridDim.x, outer = gridDim.y;
  long long first = (long long)blockIdx.x * rows_per_chunk;
  long long last = min(first + rows_per_chunk, rows);
  // With several rows at once, each thread takes one group (every thread reaches the
  // barriers); with one, the threads loop over the groups.
  int g_first = lanes > 1 ? g0 : threadIdx.x, g_step = lanes > 1 ? groups : blockDim.x;
  for (int g = g_first; g < groups; g += g_step) {
    float sum[VEC], lo[VEC], hi[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum[j] = 0.f, lo[j] = INFINITY, hi[j] = -INFINITY;
    if (lane < lanes) {
#pragma unroll 4
      for (long long r = first + lane; r < last; r += lanes) {
        float v[VEC];
        Vec<T, VEC>::load(x + (o * rows + r) * inner + g * VEC, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[j] += v[j], lo[j] = fminf(lo[j], v[j]), hi[j] = fmaxf(hi[j], v[j]);
      }
    }
    if (lanes > 1) {
      // Each lane's values to shared memory; lane 0 adds them up in lane order.
      float* mine = merged + 3 * VEC * threadIdx.x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) mine[j] = sum[j], mine[VEC + j] = lo[j], mine[2 * VEC + j] = hi[j];
      __syncthreads();
      if (lane == 0) {
        for (int l = 1; l < lanes; ++l) {
          const float* other = merged + 3 * VEC * (l * groups + g0);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            sum[j] += other[j];
            lo[j] = fminf(lo[j], other[VEC + j]);
            hi[j] = fmaxf(hi[j], other[2 * VEC + j]);
          }
        }
      }
      __syncthreads();
      if (lane != 0) continue;
    }
    long long plane = chunks * outer * inner;
    float* out = partial + ((long long)blockIdx.x * outer + o) * inner + g * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out[j] = sum[j];
      out[plane + j] = lo[j];
      out[2 * plane + j] = hi[j];
    }
  }
}

// The chunks' values merged, one thread a channel (outer · inner of them): mean[c] = sum / rows,
// and the largest |x - mean| over every channel into *absmax (0 before) by an atomic maximum:
// max(largest - mean, mean - least), which equals the largest |x - mean| computed element by
// element in f32 (x - mean rounds monotonically in x).
__device__ void channel_stats_merge(const float* partial, float* mean, float* absmax,
                                    long long rows, long long channels, int chunks) {
  __shared__ float block_max[32];
  long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  float spread = 0.f;
  if (c < channels) {
    long long plane = chunks * channels;
    float sum = 0.f, lo = INFINITY, hi = -INFINITY;
    for (int k = 0; k < chunks; ++k) {
      sum += partial[k * channels + c];
      lo = fminf(lo, partial[plane + k * channels + c]);
      hi = fmaxf(hi, partial[2 * plane + k * channels + c]);
    }
    float m = sum / rows;
    mean[c] = m;
    spread = fmaxf(hi - m, m - lo);
  }
  spread = block_reduce(spread, block_max, Max());
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(absmax), __float_as_int(spread));
}

extern "C" __global__ void channel_stats_merge_f32(const float* partial, float* mean,
                                                   float* absmax, long long rows,
                                                   long long channels, int chunks) {
  channel_stats_merge(partial, mean, absmax, rows, channels, chunks);
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
  if (fp8_padding_row<VEC>(y8, y8_scales, r, rows, cols) || r >= rows) return;
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
  store_row_at<T, VEC>(values, y, y8, y8_scales, r, cols, partial);
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
// VEC = 4 or 8 16-bit elements a thread (8- or 16-byte accesses; the caller checks the
// alignment).
#define FP8_GROUP_KERNELS(SUFFIX, T, VEC)                                                      \
  extern "C" __global__ void absmax_all_x##VEC##_##SUFFIX(const T* x, const float* offsets,   \
                                                          long long inner, long long span,    \
                                                          float* out, long long n) {          \
    absmax_all<T, VEC>(x, offsets, inner, span, out, n);                                       \
  }                                                                                            \
  extern "C" __global__ void quantize_fp8_x##VEC##_##SUFFIX(                                  \
      const T* x, const float* scales, int scale_stride, const float* offsets,                 \
      long long inner, long long span, __nv_fp8_e4m3* y, long long n, int cols) {              \
    quantize_fp8_groups<T, VEC>(x, scales, scale_stride, offsets, inner, span, y, n, cols);    \
  }                                                                                            \
  extern "C" __global__ void add_offsets_x##VEC##_##SUFFIX(T* y, const float* offsets,        \
                                                           long long inner, long long span,   \
                                                           long long n) {                     \
    add_offsets_groups<T, VEC>(y, offsets, inner, span, n);                                    \
  }
#define FP8_ROW_KERNELS(SUFFIX, T)                                                             \
  extern "C" __global__ void channel_stats_x8_##SUFFIX(const T* x, float* partial,            \
                                                       long long rows, int inner,             \
                                                       int rows_per_chunk) {                  \
    channel_stats<T, 8>(x, partial, rows, inner, rows_per_chunk);                              \
  }                                                                                            \
  extern "C" __global__ void rows_scale_act_x8_##SUFFIX(                                      \
      const T* x, float factor, const float* row_scales, const float* column_scales,           \
      int column_stride, const T* bias, int gelu, T* y, __nv_fp8_e4m3* y8, float* y8_scales,   \
      int cols, int rows) {                                                                    \
    rows_scale_act<T, 8>(x, factor, row_scales, column_scales, column_stride, bias, gelu, y,   \
                         y8, y8_scales, cols, rows);                                           \
  }
FP8_GROUP_KERNELS(bf16, __nv_bfloat16, 4)
FP8_GROUP_KERNELS(f16, __half, 4)
FP8_GROUP_KERNELS(bf16, __nv_bfloat16, 8)
FP8_GROUP_KERNELS(f16, __half, 8)
FP8_ROW_KERNELS(bf16, __nv_bfloat16)
FP8_ROW_KERNELS(f16, __half)
FP8_KERNELS(f32, float)
FP8_KERNELS(bf16, __nv_bfloat16)
FP8_KERNELS(f16, __half)
