// Element-wise kernels of the VAE's channels-last path on CUDA.
#include "common.cuh"

// Nearest ×2 spatial upsampling into a packed channels-last clip y [B, F, 2H, 2W, C].
// x is any strided view of [B, C, F, H, W] whose frame f is read at (f / inner)·s_outer +
// (f % inner)·s_inner: the time upsampling's interleave of channel halves into frames
// ([B, C, F/2, 2, H, W]) is read in place. One thread per VEC channels of an input position;
// it writes the 2 × 2 copies (VEC > 1 needs s_channel = 1).
template <typename T, int VEC>
__device__ void upsample2x_cl(const T* x, T* y, int channels, int frames, int height, int width,
                              int inner, long long total, long long s_batch, long long s_channel,
                              long long s_outer, long long s_inner, long long s_row,
                              long long s_col) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int groups = channels / VEC;
  const int c = (i % groups) * VEC;
  long long rest = i / groups;
  const int w = rest % width;
  rest /= width;
  const int h = rest % height;
  rest /= height;
  const int f = rest % frames;
  const long long b = rest / frames;
  float v[VEC];
  if (VEC == 1) {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      v[k] = to_f32(x[b * s_batch + (c + k) * s_channel + (f / inner) * s_outer +
                      (f % inner) * s_inner + h * s_row + w * s_col]);
  } else {
    Vec<T, VEC>::load(x + b * s_batch + c + (f / inner) * s_outer + (f % inner) * s_inner +
                          h * s_row + w * s_col,
                      v);
  }
  const long long out_row = 2LL * width * channels;
  T* o = y + ((b * frames + f) * 2LL * height + 2LL * h) * out_row + 2LL * w * channels + c;
  Vec<T, VEC>::store(o, v);
  Vec<T, VEC>::store(o + channels, v);
  Vec<T, VEC>::store(o + out_row, v);
  Vec<T, VEC>::store(o + out_row + channels, v);
}

#define UPSAMPLE(NAME, T, VEC)                                                                 \
  extern "C" __global__ void NAME(const T* x, T* y, int channels, int frames, int height,      \
                                  int width, int inner, long long total, long long s_batch,    \
                                  long long s_channel, long long s_outer, long long s_inner,   \
                                  long long s_row, long long s_col) {                          \
    upsample2x_cl<T, VEC>(x, y, channels, frames, height, width, inner, total, s_batch,        \
                          s_channel, s_outer, s_inner, s_row, s_col);                          \
  }
UPSAMPLE(upsample2x_cl_f32, float, 1)
UPSAMPLE(upsample2x_cl_bf16, __nv_bfloat16, 1)
UPSAMPLE(upsample2x_cl_f16, __half, 1)
UPSAMPLE(upsample2x_cl_bf16_vec4, __nv_bfloat16, 4)
UPSAMPLE(upsample2x_cl_f16_vec4, __half, 4)

// y ← y + bias[c] + residual, in place on a packed channels-last convolution output, summed in
// f32 and rounded once. `bias` or `residual` (packed like y) may be null. One thread per VEC elements
// (VEC 4 needs C divisible by 4).
template <typename T, int VEC>
__device__ void bias_residual(T* y, const T* bias, const T* residual, int channels,
                              long long total) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const long long at = i * VEC;
  const int c = at % channels;
  float v[VEC];
  Vec<T, VEC>::load(y + at, v);
  if (residual) {
    float r[VEC];
    Vec<T, VEC>::load(residual + at, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] += r[k];
  }
  if (bias) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] += to_f32(bias[c + k]);
  }
  Vec<T, VEC>::store(y + at, v);
}

#define BIAS_RESIDUAL(NAME, T, VEC)                                                            \
  extern "C" __global__ void NAME(T* y, const T* bias, const T* residual, int channels,        \
                                  long long total) {                                           \
    bias_residual<T, VEC>(y, bias, residual, channels, total);                                 \
  }
BIAS_RESIDUAL(bias_residual_f32, float, 1)
BIAS_RESIDUAL(bias_residual_bf16, __nv_bfloat16, 1)
BIAS_RESIDUAL(bias_residual_f16, __half, 1)
BIAS_RESIDUAL(bias_residual_bf16_vec4, __nv_bfloat16, 4)
BIAS_RESIDUAL(bias_residual_f16_vec4, __half, 4)

// A convolution filter [K, C, S] (S = kt·kh·kw taps) rearranged for cuDNN's channels-last
// kernels: [K_pad, S, C_pad], zero-padded to K_pad output and C_pad input channels. One block
// per output channel: its C·S weights are staged in shared memory by contiguous reads and leave
// by contiguous writes (a per-element strided copy reads 2-byte values 2·S bytes apart).
template <typename T>
__device__ void filter_channels_last(const T* w, T* out, int k_in, int c_in, int taps,
                                     int c_pad) {
  extern __shared__ unsigned char staged_raw[];
  T* staged = reinterpret_cast<T*>(staged_raw);
  const int k = blockIdx.x;
  const int n = c_in * taps;
  if (k < k_in)
    for (int i = threadIdx.x; i < n; i += blockDim.x) staged[i] = w[(long long)k * n + i];
  __syncthreads();
  const int m = taps * c_pad;
  T* o = out + (long long)k * m;
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    const int c = i % c_pad, tap = i / c_pad;
    o[i] = (k < k_in && c < c_in) ? staged[c * taps + tap] : from_f32<T>(0.f);
  }
}

#define FILTER_CL(NAME, T)                                                                      \
  extern "C" __global__ void NAME(const T* w, T* out, int k_in, int c_in, int taps, int c_pad) { \
    filter_channels_last<T>(w, out, k_in, c_in, taps, c_pad);                                   \
  }
FILTER_CL(filter_channels_last_f32, float)
FILTER_CL(filter_channels_last_bf16, __nv_bfloat16)
FILTER_CL(filter_channels_last_f16, __half)
