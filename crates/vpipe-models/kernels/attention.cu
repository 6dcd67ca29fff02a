// Fused attention, softmax(q·kᵀ·scale)·v, for bf16/f16 and head dim 128 (every Wan 2.1 DiT):
// the scores of one 128 × 64 tile live in registers only, with the running max and sum of the
// online softmax, so memory stays O(L·D) and q, k and v are each read once per block.
//
// One block = 4 warps = 128 query rows of one (batch, head); each warp owns two 16-row mma
// tiles (so every k or v fragment it loads from shared memory feeds two products) and walks over
// the keys 64 at a time. Products use the tensor cores through mma.sync m16n8k16 (f32
// accumulate); q, k and v are staged in shared memory with cp.async (V's load overlaps q·kᵀ, the
// next K's load overlaps p·v). Rows are padded by 16 bytes so ldmatrix and the 16-byte stores
// hit 32 distinct banks.
//
// q, k, v and out are addressed by element strides (batch, head, row) with the head dimension
// contiguous, so token-major [B, L, H, D] and head-major [B, H, L, D] both work without copies.
#include "common.cuh"

namespace {

constexpr int HEAD_DIM = 128;
constexpr int WARPS = 4;
constexpr int M_TILES = 2;                      // 16-row mma tiles per warp
constexpr int ROWS_PER_WARP = 16 * M_TILES;
constexpr int BLOCK_Q = WARPS * ROWS_PER_WARP;  // 128
constexpr int BLOCK_K = 64;
constexpr int PAD = 8;                           // elements; 16 bytes
constexpr int SMEM_ROW = HEAD_DIM + PAD;         // 136 elements = 272 bytes
#define NEG_INF __int_as_float(0xff800000)
constexpr int CHUNKS_PER_ROW = HEAD_DIM * 2 / 16;  // 16-byte pieces per row

// Element strides of one operand; the head dimension is contiguous.
struct Strides {
  long long batch, head, row;
};

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Copies 16 bytes global -> shared; `valid` false writes zeros (rows past the sequence end,
// which must be zero rather than garbage: a zero probability times a NaN is still NaN).
__device__ __forceinline__ void copy_16(void* dst, const void* src, bool valid) {
  int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(bytes));
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Stages rows [first, first + ROWS) of one head's q, k or v into `tile`; rows past `len` are
// zeros (a zero probability times garbage could be NaN). `commit` closes the cp.async group.
template <typename T, int ROWS>
__device__ __forceinline__ void stage_rows(T* tile, const T* src, long long row_stride,
                                           int first, int len, bool commit) {
  for (int i = threadIdx.x; i < ROWS * CHUNKS_PER_ROW; i += WARPS * 32) {
    int r = i / CHUNKS_PER_ROW, c = i % CHUNKS_PER_ROW;
    int row = first + r;
    bool valid = row < len;
    const T* from = src + (valid ? row : 0) * row_stride + c * 8;
    copy_16(tile + r * SMEM_ROW + c * 8, from, valid);
  }
  if (commit) copy_commit();
}

template <typename T>
__device__ void flash_attention(const T* q, const T* k, const T* v, T* out, Strides qs,
                                Strides ks, Strides vs, Strides os, int heads, int q_len,
                                int k_len, float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* k_tile = q_tile + BLOCK_Q * SMEM_ROW;
  T* v_tile = k_tile + BLOCK_K * SMEM_ROW;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  q += b * qs.batch + h * qs.head;
  k += b * ks.batch + h * ks.head;
  v += b * vs.batch + h * vs.head;
  out += b * os.batch + h * os.head;
  const int block_row0 = blockIdx.x * BLOCK_Q;
  const int warp_row0 = warp * ROWS_PER_WARP;  // within the block

  // Q and the first K tile arrive in one cp.async group.
  stage_rows<T, BLOCK_Q>(q_tile, q, qs.row, block_row0, q_len, false);
  stage_rows<T, BLOCK_K>(k_tile, k, ks.row, 0, k_len, true);

  float acc[M_TILES][HEAD_DIM / 8][4];
  #pragma unroll
  for (int m = 0; m < M_TILES; ++m)
    #pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.f;
  float row_max[M_TILES][2], row_sum[M_TILES][2];
  #pragma unroll
  for (int m = 0; m < M_TILES; ++m)
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[m][half] = NEG_INF;
      row_sum[m][half] = 0.f;
    }

  const int tiles = (k_len + BLOCK_K - 1) / BLOCK_K;
  for (int j = 0; j < tiles; ++j) {
    const int key0 = j * BLOCK_K;
    stage_rows<T, BLOCK_K>(v_tile, v, vs.row, key0, k_len, true);
    copy_wait<1>();  // Q and K tile j have landed
    __syncthreads();

    // Scores of 16·M_TILES rows × BLOCK_K keys.
    float s[M_TILES][BLOCK_K / 8][4];
    #pragma unroll
    for (int m = 0; m < M_TILES; ++m)
      #pragma unroll
      for (int n = 0; n < BLOCK_K / 8; ++n)
        #pragma unroll
        for (int i = 0; i < 4; ++i) s[m][n][i] = 0.f;
    #pragma unroll
    for (int kstep = 0; kstep < HEAD_DIM / 16; ++kstep) {
      unsigned qa[M_TILES][4];
      #pragma unroll
      for (int m = 0; m < M_TILES; ++m)
        ldmatrix_x4(qa[m], q_tile + (warp_row0 + m * 16 + lane % 16) * SMEM_ROW + kstep * 16 +
                               (lane / 16) * 8);
      #pragma unroll
      for (int n2 = 0; n2 < BLOCK_K / 16; ++n2) {
        // Matrices: key tile 2·n2 (columns lo, hi), key tile 2·n2 + 1 (lo, hi).
        unsigned kb[4];
        ldmatrix_x4(kb, k_tile + ((2 * n2 + lane / 16) * 8 + lane % 8) * SMEM_ROW +
                            kstep * 16 + ((lane / 8) % 2) * 8);
        #pragma unroll
        for (int m = 0; m < M_TILES; ++m) {
          Mma<T>::run(s[m][2 * n2], qa[m], kb[0], kb[1]);
          Mma<T>::run(s[m][2 * n2 + 1], qa[m], kb[2], kb[3]);
        }
      }
    }
    if (key0 + BLOCK_K > k_len) {
      #pragma unroll
      for (int m = 0; m < M_TILES; ++m)
        #pragma unroll
        for (int n = 0; n < BLOCK_K / 8; ++n)
          #pragma unroll
          for (int i = 0; i < 4; ++i)
            if (key0 + n * 8 + 2 * t + (i & 1) >= k_len) s[m][n][i] = NEG_INF;
    }

    // Online softmax: in m-tile m, rows g (i = 0, 1) and g + 8 (i = 2, 3); a row's scores are
    // spread over the 4 lanes sharing g.
    #pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
      float scale_old[2];
      #pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = row_max[m][half];
        #pragma unroll
        for (int n = 0; n < BLOCK_K / 8; ++n)
          mx = fmaxf(mx, fmaxf(s[m][n][2 * half], s[m][n][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float mx_scaled = mx * scale_log2;
        scale_old[half] = exp2f(row_max[m][half] * scale_log2 - mx_scaled);
        row_max[m][half] = mx;
        float sum = 0.f;
        #pragma unroll
        for (int n = 0; n < BLOCK_K / 8; ++n)
          #pragma unroll
          for (int i = 2 * half; i < 2 * half + 2; ++i) {
            s[m][n][i] = exp2f(s[m][n][i] * scale_log2 - mx_scaled);
            sum += s[m][n][i];
          }
        // Lane-partial; the 4 lanes of a row are summed once, at the end.
        row_sum[m][half] = row_sum[m][half] * scale_old[half] + sum;
      }
      #pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n) {
        acc[m][n][0] *= scale_old[0];
        acc[m][n][1] *= scale_old[0];
        acc[m][n][2] *= scale_old[1];
        acc[m][n][3] *= scale_old[1];
      }
    }

    copy_wait<0>();  // V tile j has landed
    __syncthreads();  // ...and every warp is done with K tile j
    if (j + 1 < tiles) stage_rows<T, BLOCK_K>(k_tile, k, ks.row, key0 + BLOCK_K, k_len, true);

    // acc += p · v: the score accumulators of key tiles 2kk, 2kk+1 are exactly the A fragment
    // of k-step kk.
    #pragma unroll
    for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
      unsigned pa[M_TILES][4];
      #pragma unroll
      for (int m = 0; m < M_TILES; ++m) {
        pa[m][0] = Mma<T>::pack(s[m][2 * kk][0], s[m][2 * kk][1]);
        pa[m][1] = Mma<T>::pack(s[m][2 * kk][2], s[m][2 * kk][3]);
        pa[m][2] = Mma<T>::pack(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
        pa[m][3] = Mma<T>::pack(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
      }
      // Thread `lane` points at key row kk*16 + (lane%16), column block lane/16 (+2 per pair).
      const T* base = v_tile + (kk * 16 + lane % 16) * SMEM_ROW + (lane / 16) * 8;
      #pragma unroll
      for (int n2 = 0; n2 < HEAD_DIM / 16; ++n2) {
        unsigned vb[4];
        ldmatrix_x4_trans(vb, base + n2 * 16);
        #pragma unroll
        for (int m = 0; m < M_TILES; ++m) {
          Mma<T>::run(acc[m][2 * n2], pa[m], vb[0], vb[1]);
          Mma<T>::run(acc[m][2 * n2 + 1], pa[m], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with V tile j before the next one lands
  }

  #pragma unroll
  for (int m = 0; m < M_TILES; ++m)
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = row_sum[m][half];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      const float inv = 1.f / l;
      const int r = block_row0 + warp_row0 + m * 16 + g + 8 * half;
      if (r >= q_len) continue;
      T* dst = out + r * os.row + 2 * t;
      #pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n) {
        unsigned packed =
            Mma<T>::pack(acc[m][n][2 * half] * inv, acc[m][n][2 * half + 1] * inv);
        *reinterpret_cast<unsigned*>(dst + n * 8) = packed;
      }
    }
}

}  // namespace

// Strides arrive as 12 scalars (q, k, v, out × batch, head, row) to keep the launch ABI plain.
// Dynamic shared memory: (BLOCK_Q + 2 · BLOCK_K) rows of 272 bytes = 69 632 bytes.
//
// The shape (2 m-tiles per warp, 64 keys per step) was the fastest of three measured on the
// H100 (BENCHMARKS.md, "fused attention kernel"): 1 m-tile of 64 keys 0.176 s per 14B
// self-attention layer at B = 2, 2 × 32 keys 0.157 s, 2 × 64 keys 0.139 s, although the last
// spills 32 bytes per thread at 255 registers.
#define FLASH_KERNEL(SUFFIX, T)                                                                \
  extern "C" __global__ void __launch_bounds__(WARPS * 32) flash_attention_##SUFFIX(          \
      const T* q, const T* k, const T* v, T* out, long long qb, long long qh, long long qr,    \
      long long kb, long long kh, long long kr, long long vb, long long vh, long long vr,      \
      long long ob, long long oh, long long orow, int heads, int q_len, int k_len,             \
      float scale_log2) {                                                                      \
    flash_attention<T>(q, k, v, out, {qb, qh, qr}, {kb, kh, kr}, {vb, vh, vr},                 \
                       {ob, oh, orow}, heads, q_len, k_len, scale_log2);                       \
  }
FLASH_KERNEL(bf16, __nv_bfloat16)
FLASH_KERNEL(f16, __half)
