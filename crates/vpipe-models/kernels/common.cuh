// Conversions shared by vpipe's CUDA kernels: every kernel reads and writes f32, bf16 or f16
// and computes in f32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
template <typename T> struct Vec<T, 4> {
  static_assert(sizeof(T) == 2, "four 16-bit values");
  static __device__ __forceinline__ void load(const T* p, float (&v)[4]) {
    T four[4];
    *reinterpret_cast<uint2*>(four) = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = to_f32(four[i]);
  }
  static __device__ __forceinline__ void store(T* p, const float (&v)[4]) {
    T four[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) four[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(four);
  }
};

template <typename T> struct Vec<T, 8> {
  static_assert(sizeof(T) == 2, "eight 16-bit values");
  static __device__ __forceinline__ void load(const T* p, float (&v)[8]) {
    T eight[8];
    *reinterpret_cast<uint4*>(eight) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32(eight[i]);
  }
  static __device__ __forceinline__ void store(T* p, const float (&v)[8]) {
    T eight[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) eight[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(eight);
  }
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
