// Conversions shared by vpipe's CUDA kernels: every kernel reads and writes f32, bf16 or f16
// and computes in f32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

// e4m3's largest finite value, and the least scale a row of zeros gets.
#define FP8_MAX 448.f
#define MIN_SCALE 1e-12f

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

// VEC consecutive elements as one access: VEC 1, or 4 or 8 16-bit values (one 8- or 16-byte
// access; the caller guarantees that alignment).
template <typename T, int VEC> struct Vec;
template <typename T> struct Vec<T, 1> {
  static __device__ __forceinline__ void load(const T* p, float (&v)[1]) { v[0] = to_f32(*p); }
  static __device__ __forceinline__ void store(T* p, const float (&v)[1]) {
    *p = from_f32<T>(v[0]);
  }
};
// The word that holds VEC 16-bit values.
template <int VEC> struct Word16;
template <> struct Word16<4> { using type = uint2; };
template <> struct Word16<8> { using type = uint4; };
template <typename T, int VEC> struct Vec {
  static_assert(sizeof(T) == 2, "16-bit values");
  using Word = typename Word16<VEC>::type;
  static __device__ __forceinline__ void load(const T* p, float (&v)[VEC]) {
    T values[VEC];
    *reinterpret_cast<Word*>(values) = *reinterpret_cast<const Word*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_f32(values[i]);
  }
  static __device__ __forceinline__ void store(T* p, const float (&v)[VEC]) {
    T values[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) values[i] = from_f32<T>(v[i]);
    *reinterpret_cast<Word*>(p) = *reinterpret_cast<const Word*>(values);
  }
};

// VEC consecutive f32 values from global memory, as 16-byte words where VEC is a multiple of 4
// (p then 16-byte aligned): a quarter of the load instructions of one float at a time, which
// is what bounded the row kernels that read a modulation or a mean per element.
template <int VEC>
__device__ __forceinline__ void load_f32(const float* p, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      float4 w = __ldg(reinterpret_cast<const float4*>(p + j));
      v[j] = w.x, v[j + 1] = w.y, v[j + 2] = w.z, v[j + 3] = w.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = p[j];
  }
}

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// `op` over the block (an associative operation with 0 as its identity on the values given:
// a sum, or the largest of values that are not negative); every thread gets the result.
// `shared` holds 32 floats.
template <typename Op>
__device__ float block_reduce(float v, float* shared, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  int warps = (blockDim.x + 31) / 32;
  v = lane < warps ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// The word that holds VEC float8 values.
template <int VEC> struct Word8;
template <> struct Word8<1> { using type = unsigned char; };
template <> struct Word8<4> { using type = unsigned int; };
template <> struct Word8<8> { using type = uint2; };

// The scale of a row quantised to e4m3, from each thread's largest |value| m: the row's
// largest over the block times 1/448 (at least MIN_SCALE), as the CPU computes it (no fused
// rounding: the add is 0); thread 0 writes it to *y8_scale. `partial` holds 32 floats.
__device__ __forceinline__ float fp8_row_scale(float m, float* partial, float* y8_scale) {
  m = block_reduce(m, partial, Max());
  float s = fmaxf(m * (1.f / FP8_MAX), MIN_SCALE);
  if (threadIdx.x == 0) *y8_scale = s;
  return s;
}

// VEC values over the scale s, clamped to e4m3's range and stored as one word at p.
template <int VEC>
__device__ __forceinline__ void store_fp8(__nv_fp8_e4m3* p, const float (&v)[VEC], float s) {
  unsigned char packed[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    packed[j] = __nv_fp8_e4m3(fminf(fmaxf(v[j] / s, -FP8_MAX), FP8_MAX)).__x;
  *reinterpret_cast<typename Word8<VEC>::type*>(p) =
      *reinterpret_cast<const typename Word8<VEC>::type*>(packed);
}

// The end of a kernel of one row per block: the row's values, VEC at a time from column c as
// `values(c, v)` gives them in f32, stored to y as T; or, with y8, quantised to e4m3 over the
// row's scale (its largest |value| over FP8_MAX, at least MIN_SCALE), which goes to *y8_scale:
// a float8 product's input with per-token scales. `partial` holds 32 floats.
template <typename T, int VEC, typename Values>
__device__ void store_row(const Values& values, T* y, __nv_fp8_e4m3* y8, float* y8_scale,
                          int cols, float* partial) {
  if (!y8) {
    for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
      float v[VEC];
      values(c, v);
      Vec<T, VEC>::store(y + c, v);
    }
    return;
  }
  // Where the row is at most one group a thread (the launches size their blocks so), each
  // thread's values are computed once and kept for the quantisation; else twice.
  const bool kept_whole = cols <= blockDim.x * VEC;
  const int c0 = threadIdx.x * VEC;
  float kept[VEC];
  float m = 0.f;
  if (kept_whole) {
    if (c0 < cols) {
      values(c0, kept);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = fmaxf(m, fabsf(kept[j]));
    }
  } else {
    for (int c = c0; c < cols; c += blockDim.x * VEC) {
      float v[VEC];
      values(c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = fmaxf(m, fabsf(v[j]));
    }
  }
  float s = fp8_row_scale(m, partial, y8_scale);
  if (kept_whole) {
    if (c0 < cols) store_fp8<VEC>(y8 + c0, kept, s);
    return;
  }
  for (int c = c0; c < cols; c += blockDim.x * VEC) {
    float v[VEC];
    values(c, v);
    store_fp8<VEC>(y8 + c, v, s);
  }
}

// A padding row of a float8 product's input (cuBLASLt's tiles take whole 16 rows): zeros,
// with a zero scale.
template <int VEC>
__device__ void zero_fp8_row(__nv_fp8_e4m3* y8, float* y8_scale, int cols) {
  for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC)
    *reinterpret_cast<typename Word8<VEC>::type*>(y8 + c) = typename Word8<VEC>::type{};
  if (threadIdx.x == 0) *y8_scale = 0.f;
}

// In a kernel of one token row per block that may quantise its rows (y8): whether block r is
// past the `rows` rows, in which case it writes a padding row (zero_fp8_row) and has nothing
// else to do. Without y8, never.
template <int VEC>
__device__ bool fp8_padding_row(__nv_fp8_e4m3* y8, float* y8_scales, long long r, long long rows,
                                int cols) {
  if (!y8 || r < rows) return false;
  zero_fp8_row<VEC>(y8 + r * cols, y8_scales + r, cols);
  return true;
}

// store_row of row r: to y's row r, or with y8 quantised into y8's row r and y8_scales[r].
template <typename T, int VEC, typename Values>
__device__ void store_row_at(const Values& values, T* y, __nv_fp8_e4m3* y8, float* y8_scales,
                             long long r, int cols, float* partial) {
  store_row<T, VEC>(values, y8 ? nullptr : y + r * cols, y8 ? y8 + r * cols : nullptr,
                    y8 ? y8_scales + r : nullptr, cols, partial);
}
