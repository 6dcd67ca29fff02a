// The VAE decoder's spatial ×2 nearest upsampling, fused with the layout changes around it:
// x [B, C, T, H, W] -> y [B·T, C, 2H, 2W], the frames as the 2D convolution after it takes
// them. x may be a strided view whose H×W planes are contiguous, and its frames may come in
// groups of `inner` (the time upsampling's [B, C, T/2, 2, H, W] interleave), so neither the
// permute nor the interleave is copied first. One thread per input element; it writes its
// 2 × 2 copies, so reads and writes are both coalesced (candle's upsample_nearest2d after a
// permute copy took 3.4× PyTorch's time on the H100 profile,
// bench/results/2026-11-27-vae-ncu-decode.txt).
#include "common.cuh"

template <typename T>
__device__ void upsample2x_frames(const T* x, T* y, int channels, int frames, int height,
                                  int width, long long total, long long s_batch,
                                  long long s_channel, long long s_outer, long long s_inner,
                                  int inner) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int w = i % width;
  long long rest = i / width;
  const int h = rest % height;
  rest /= height;
  const int t = rest % frames;
  rest /= frames;
  const int c = rest % channels;
  const long long b = rest / channels;
  const T v = x[b * s_batch + c * s_channel + (t / inner) * s_outer + (t % inner) * s_inner +
                (long long)h * width + w];
  const long long out_w = 2LL * width;
  T* row = y + (((b * frames + t) * channels + c) * 2LL * height + 2LL * h) * out_w + 2LL * w;
  row[0] = v;
  row[1] = v;
  row[out_w] = v;
  row[out_w + 1] = v;
}

#define UPSAMPLE(SUFFIX, T)                                                                   \
  extern "C" __global__ void upsample2x_frames_##SUFFIX(                                      \
      const T* x, T* y, int channels, int frames, int height, int width, long long total,     \
      long long s_batch, long long s_channel, long long s_outer, long long s_inner,           \
      int inner) {                                                                            \
    upsample2x_frames<T>(x, y, channels, frames, height, width, total, s_batch, s_channel,    \
                         s_outer, s_inner, inner);                                            \
  }
UPSAMPLE(f32, float)
UPSAMPLE(bf16, __nv_bfloat16)
UPSAMPLE(f16, __half)
