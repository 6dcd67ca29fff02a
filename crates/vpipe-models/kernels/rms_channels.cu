// RMS norm over the channels of a channels-last clip, optionally followed by SiLU:
// y = f(x · rsqrt(mean_c x² + eps) · γ[c]), f = SiLU or identity, in f32.
//
// x is read as rows of C contiguous channels, row (b, t, p) at b·x_batch + t·x_frame +
// p·x_position (p: the H·W positions of a frame), so a time slice of a larger clip needs no
// copy. y is a packed [B, y_frames, H·W, C] buffer whose frames y_front.. receive the rows: a
// causal convolution's front frames (cache or zeros) can sit before them in the same buffer.
//
// One warp per row; lane l takes channels l·VEC, l·VEC + 32·VEC, …, so each warp's loads of a
// row are one contiguous run, and consecutive warps read consecutive rows.
#include "common.cuh"

template <typename T, int VEC>
__device__ void rms_rows(const T* x, const T* gamma, T* y, int channels, int frames,
                         long long positions, long long rows, long long x_batch,
                         long long x_frame, long long x_position, long long y_frames,
                         long long y_front, float eps, int silu) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const long long p = row % positions;
  const long long rest = row / positions;
  const long long t = rest % frames, b = rest / frames;
  const T* xr = x + b * x_batch + t * x_frame + p * x_position;
  T* yr = y + ((b * y_frames + y_front + t) * positions + p) * channels;

  float sum = 0.f;
  for (int c = lane * VEC; c < channels; c += 32 * VEC) {
    float v[VEC];
    Vec<T, VEC>::load(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[i] * v[i];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float inv = rsqrtf(sum / channels + eps);
  for (int c = lane * VEC; c < channels; c += 32 * VEC) {
    float v[VEC];
    Vec<T, VEC>::load(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] *= inv * to_f32(gamma[c + i]);
      if (silu) v[i] = v[i] / (1.f + __expf(-v[i]));
    }
    Vec<T, VEC>::store(yr + c, v);
  }
}

// Launch: blocks of 256 threads (8 rows), grid ceil(rows / 8). VEC 4 needs C, the three x
// strides and both pointers' element offsets divisible by 4 (the `_vec4` kernels).
#define RMS_ROWS(NAME, T, VEC)                                                                 \
  extern "C" __global__ void NAME(const T* x, const T* gamma, T* y, int channels, int frames,  \
                                  long long positions, long long rows, long long x_batch,      \
                                  long long x_frame, long long x_position, long long y_frames, \
                                  long long y_front, float eps, int silu) {                    \
    rms_rows<T, VEC>(x, gamma, y, channels, frames, positions, rows, x_batch, x_frame,         \
                     x_position, y_frames, y_front, eps, silu);                                \
  }
RMS_ROWS(rms_rows_f32, float, 1)
RMS_ROWS(rms_rows_bf16, __nv_bfloat16, 1)
RMS_ROWS(rms_rows_f16, __half, 1)
RMS_ROWS(rms_rows_bf16_vec4, __nv_bfloat16, 4)
RMS_ROWS(rms_rows_f16_vec4, __half, 4)
