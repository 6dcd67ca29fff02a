// RMS norm over the channel dimension of a contiguous [B, C, S] tensor (S = all positions),
// optionally followed by SiLU: y[b,c,s] = f(x[b,c,s] * rsqrt(mean_c x[b,:,s]^2 + eps) * g[c]).
// One thread per (b, s); consecutive threads read consecutive s, so every channel's loads are
// coalesced and no transpose is needed. Accumulation in f32.
#include "common.cuh"

template <typename T>
__device__ void rms_channels(const T* x, const T* gamma, T* y, long long batches, int channels,
                             long long positions, float eps, int silu) {
  long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= batches * positions) return;
  long long b = idx / positions, s = idx - b * positions;
  const T* xp = x + b * channels * positions + s;
  T* yp = y + b * channels * positions + s;
  float sum = 0.f;
  for (int c = 0; c < channels; ++c) {
    float v = to_f32(xp[(long long)c * positions]);
    sum += v * v;
  }
  float inv = rsqrtf(sum / channels + eps);
  for (int c = 0; c < channels; ++c) {
    float v = to_f32(xp[(long long)c * positions]) * inv * to_f32(gamma[c]);
    if (silu) v = v / (1.f + __expf(-v));
    yp[(long long)c * positions] = from_f32<T>(v);
  }
}

#define RMS_CHANNELS(NAME, T)                                                                 \
  extern "C" __global__ void NAME(const T* x, const T* gamma, T* y, long long batches,        \
                                  int channels, long long positions, float eps, int silu) {   \
    rms_channels<T>(x, gamma, y, batches, channels, positions, eps, silu);                    \
  }
RMS_CHANNELS(rms_channels_f32, float)
RMS_CHANNELS(rms_channels_bf16, __nv_bfloat16)
RMS_CHANNELS(rms_channels_f16, __half)
