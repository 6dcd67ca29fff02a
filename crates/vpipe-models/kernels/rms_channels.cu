// RMS norm over the channel dimension of a [B, C, S] tensor (S = all positions),
// optionally followed by SiLU: y[b,c,s] = f(x[b,c,s] * rsqrt(mean_c x[b,:,s]^2 + eps) * g[c]).
// x may be a strided view: position s = t·frame + r of item b, channel c is read at
// b·in_batch + c·in_channel + t·in_frame + r (a [T, C, H, W] batch of frames seen as
// [1, C, T, H, W] needs no copy). y's rows may be longer than x's: y[b,c] starts at
// (b·C + c)·out_row and s lands at out_offset + s, so a causal convolution's front frames can
// sit before it in the same buffer.
//
// A block of 32 × ROWS threads covers 32·VEC consecutive positions of one batch item: lane x
// owns VEC adjacent positions (one 4-byte load for bf16/f16 pairs), and the ROWS warps split
// the channels (warp y takes c = y, y + ROWS, ...). Each warp's loads of one channel are one
// 128-byte line, with no transpose; the per-warp partial sums meet in shared memory.
// Accumulation in f32.
#include "common.cuh"

namespace {

constexpr int ROWS = 8;

template <typename T, int VEC> struct Pack;
template <typename T> struct Pack<T, 1> {
  static __device__ __forceinline__ void load(const T* p, float (&v)[1]) { v[0] = to_f32(*p); }
  static __device__ __forceinline__ void store(T* p, const float (&v)[1]) {
    *p = from_f32<T>(v[0]);
  }
};
template <typename T> struct Pack<T, 2> {
  static_assert(sizeof(T) == 2, "pairs of 16-bit values");
  static __device__ __forceinline__ void load(const T* p, float (&v)[2]) {
    T pair[2];
    *reinterpret_cast<unsigned*>(pair) = *reinterpret_cast<const unsigned*>(p);
    v[0] = to_f32(pair[0]);
    v[1] = to_f32(pair[1]);
  }
  static __device__ __forceinline__ void store(T* p, const float (&v)[2]) {
    T pair[2] = {from_f32<T>(v[0]), from_f32<T>(v[1])};
    *reinterpret_cast<unsigned*>(p) = *reinterpret_cast<const unsigned*>(pair);
  }
};

template <typename T, int VEC>
__device__ void rms_channels(const T* x, const T* gamma, T* y, int channels, long long positions,
                             long long frame, long long in_batch, long long in_channel,
                             long long in_frame, long long out_row, long long out_offset,
                             float eps, int silu) {
  __shared__ float partial[ROWS][32 * VEC];
  __shared__ float inv_rms[32 * VEC];
  const int lane = threadIdx.x, row = threadIdx.y;
  const long long blocks_per_item = (positions + 32 * VEC - 1) / (32 * VEC);
  const long long b = blockIdx.x / blocks_per_item;
  const long long s = (blockIdx.x - b * blocks_per_item) * 32 * VEC + lane * VEC;
  // With VEC = 2 the launcher guarantees an even `positions`, so a pair never straddles the end.
  const bool active = s < positions;
  const T* xp = x + b * in_batch + (s / frame) * in_frame + s % frame;
  T* yp = y + b * channels * out_row + out_offset + s;

  float sum[VEC] = {};
  if (active) {
#pragma unroll 4
    for (int c = row; c < channels; c += ROWS) {
      float v[VEC];
      Pack<T, VEC>::load(xp + (long long)c * in_channel, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[i] += v[i] * v[i];
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[row][lane * VEC + i] = sum[i];
  __syncthreads();
  if (row == 0) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float total = 0.f;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) total += partial[r][lane * VEC + i];
      inv_rms[lane * VEC + i] = rsqrtf(total / channels + eps);
    }
  }
  __syncthreads();
  if (!active) return;
  float inv[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) inv[i] = inv_rms[lane * VEC + i];
#pragma unroll 4
  for (int c = row; c < channels; c += ROWS) {
    float v[VEC];
    Pack<T, VEC>::load(xp + (long long)c * in_channel, v);
    const float g = to_f32(gamma[c]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] *= inv[i] * g;
      if (silu) v[i] = v[i] / (1.f + __expf(-v[i]));
    }
    Pack<T, VEC>::store(yp + (long long)c * out_row, v);
  }
}

}  // namespace

// Launch: block (32, ROWS), grid batches · ceil(positions / (32 · VEC)); VEC 2 needs even
// positions, frame, strides, out_row and out_offset (the `_pairs` kernels).
#define RMS_CHANNELS(NAME, T, VEC)                                                            \
  extern "C" __global__ void NAME(const T* x, const T* gamma, T* y, int channels,             \
                                  long long positions, long long frame, long long in_batch,   \
                                  long long in_channel, long long in_frame, long long out_row,\
                                  long long out_offset, float eps, int silu) {                \
    rms_channels<T, VEC>(x, gamma, y, channels, positions, frame, in_batch, in_channel,       \
                         in_frame, out_row, out_offset, eps, silu);                           \
  }
RMS_CHANNELS(rms_channels_f32, float, 1)
RMS_CHANNELS(rms_channels_bf16, __nv_bfloat16, 1)
RMS_CHANNELS(rms_channels_f16, __half, 1)
RMS_CHANNELS(rms_channels_bf16_pairs, __nv_bfloat16, 2)
RMS_CHANNELS(rms_channels_f16_pairs, __half, 2)
