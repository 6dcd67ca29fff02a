// Fused attention, softmax(q·kᵀ·scale)·v, for bf16/f16 and head dim 128 (every Wan 2.1 DiT):
// the scores of one 64 × 64 tile live in registers only, with the running max and sum of the
// online softmax, so memory stays O(L·D) and q, k and v are each read once per tile row.
//
// One block = 4 warps = 64 query rows of one (batch, head); each warp owns 16 rows and walks
// over the keys 64 at a time. Products use the tensor cores through mma.sync m16n8k16 (f32
// accumulate); K and V tiles are staged in shared memory with cp.async (V's load overlaps
// q·kᵀ, the next K's load overlaps p·v). Rows are padded by 16 bytes so ldmatrix and the
// 16-byte stores hit 32 distinct banks.
//
// q, k, v and out are addressed by element strides (batch, head, row) with the head dimension
// contiguous, so token-major [B, L, H, D] and head-major [B, H, L, D] both work without copies.
#include "common.cuh"

namespace {

constexpr int HEAD_DIM = 128;
constexpr int WARPS = 4;
constexpr int ROWS_PER_WARP = 16;
constexpr int BLOCK_Q = WARPS * ROWS_PER_WARP;  // 64
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

// Stages rows [first, first + BLOCK_K) of one head's keys or values into `tile`.
template <typename T>
__device__ __forceinline__ void stage_tile(T* tile, const T* src, long long row_stride,
                                           int first, int len) {
  for (int i = threadIdx.x; i < BLOCK_K * CHUNKS_PER_ROW; i += WARPS * 32) {
    int r = i / CHUNKS_PER_ROW, c = i % CHUNKS_PER_ROW;
    int row = first + r;
    bool valid = row < len;
    const T* from = src + (valid ? row : 0) * row_stride + c * 8;
    copy_16(tile + r * SMEM_ROW + c * 8, from, valid);
  }
  copy_commit();
}

template <typename T>
__device__ void flash_attention(const T* q, const T* k, const T* v, T* out, Strides qs,
                                Strides ks, Strides vs, Strides os, int heads, int q_len,
                                int k_len, float scale_log2) {
  __shared__ __align__(16) T k_tile[BLOCK_K * SMEM_ROW];
  __shared__ __align__(16) T v_tile[BLOCK_K * SMEM_ROW];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  q += b * qs.batch + h * qs.head;
  k += b * ks.batch + h * ks.head;
  v += b * vs.batch + h * vs.head;
  out += b * os.batch + h * os.head;
  const int row0 = blockIdx.x * BLOCK_Q + warp * ROWS_PER_WARP;

  stage_tile(k_tile, k, ks.row, 0, k_len);

  // This warp's 16 query rows as mma A fragments, read once from global memory.
  unsigned qa[HEAD_DIM / 16][4];
  {
    const int r_lo = row0 + g, r_hi = row0 + g + 8;
    const unsigned zero = 0;
    for (int s = 0; s < HEAD_DIM / 16; ++s) {
      const int c = s * 16 + 2 * t;
      auto load = [&](int r, int col) {
        return r < q_len ? *reinterpret_cast<const unsigned*>(q + r * qs.row + col) : zero;
      };
      qa[s][0] = load(r_lo, c);
      qa[s][1] = load(r_hi, c);
      qa[s][2] = load(r_lo, c + 8);
      qa[s][3] = load(r_hi, c + 8);
    }
  }

  float acc[HEAD_DIM / 8][4];
  for (int n = 0; n < HEAD_DIM / 8; ++n)
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
  float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};

  const int tiles = (k_len + BLOCK_K - 1) / BLOCK_K;
  for (int j = 0; j < tiles; ++j) {
    const int key0 = j * BLOCK_K;
    stage_tile(v_tile, v, vs.row, key0, k_len);
    copy_wait<1>();  // K tile j has landed
    __syncthreads();

    // Scores of 16 rows × 64 keys: 8 n-tiles of 8 keys.
    float s[BLOCK_K / 8][4];
    for (int n = 0; n < BLOCK_K / 8; ++n)
      for (int i = 0; i < 4; ++i) s[n][i] = 0.f;
    for (int n = 0; n < BLOCK_K / 8; ++n) {
      // Thread `lane` points ldmatrix at key row n*8 + lane%8, column block lane/8 (+4).
      const T* base = k_tile + (n * 8 + lane % 8) * SMEM_ROW + (lane / 8) * 8;
      for (int s2 = 0; s2 < HEAD_DIM / 32; ++s2) {
        unsigned kb[4];
        ldmatrix_x4(kb, base + s2 * 32);
        Mma<T>::run(s[n], qa[2 * s2], kb[0], kb[1]);
        Mma<T>::run(s[n], qa[2 * s2 + 1], kb[2], kb[3]);
      }
    }
    if (key0 + BLOCK_K > k_len) {
      for (int n = 0; n < BLOCK_K / 8; ++n)
        for (int i = 0; i < 4; ++i)
          if (key0 + n * 8 + 2 * t + (i & 1) >= k_len) s[n][i] = NEG_INF;
    }

    // Online softmax: rows g (i = 0, 1) and g + 8 (i = 2, 3); a row's 64 scores are spread
    // over the 4 lanes sharing g.
    float scale_old[2];
    for (int half = 0; half < 2; ++half) {
      float m = row_max[half];
      for (int n = 0; n < BLOCK_K / 8; ++n)
        m = fmaxf(m, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
      const float m_scaled = m * scale_log2;
      scale_old[half] = exp2f(row_max[half] * scale_log2 - m_scaled);
      row_max[half] = m;
      float sum = 0.f;
      for (int n = 0; n < BLOCK_K / 8; ++n)
        for (int i = 2 * half; i < 2 * half + 2; ++i) {
          s[n][i] = exp2f(s[n][i] * scale_log2 - m_scaled);
          sum += s[n][i];
        }
      row_sum[half] = row_sum[half] * scale_old[half] + sum;  // lane-partial; reduced at the end
    }
    for (int n = 0; n < HEAD_DIM / 8; ++n) {
      acc[n][0] *= scale_old[0];
      acc[n][1] *= scale_old[0];
      acc[n][2] *= scale_old[1];
      acc[n][3] *= scale_old[1];
    }

    copy_wait<0>();  // V tile j has landed
    __syncthreads();  // ...and every warp is done with K tile j
    if (j + 1 < tiles) stage_tile(k_tile, k, ks.row, key0 + BLOCK_K, k_len);

    // acc += p · v: the score accumulators of key n-tiles 2kk, 2kk+1 are exactly the A
    // fragment of k-step kk.
    for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
      unsigned pa[4] = {
          Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
          Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      // Thread `lane` points at key row kk*16 + (lane%16), column block lane/16 (+2 per pair).
      const T* base = v_tile + (kk * 16 + lane % 16) * SMEM_ROW + (lane / 16) * 8;
      for (int n2 = 0; n2 < HEAD_DIM / 16; ++n2) {
        unsigned vb[4];
        ldmatrix_x4_trans(vb, base + n2 * 16);
        Mma<T>::run(acc[2 * n2], pa, vb[0], vb[1]);
        Mma<T>::run(acc[2 * n2 + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with V tile j before the next one lands
  }

  for (int half = 0; half < 2; ++half) {
    float l = row_sum[half];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    row_sum[half] = 1.f / l;
  }
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    if (r >= q_len) continue;
    T* dst = out + r * os.row + 2 * t;
    for (int n = 0; n < HEAD_DIM / 8; ++n) {
      unsigned packed =
          Mma<T>::pack(acc[n][2 * half] * row_sum[half], acc[n][2 * half + 1] * row_sum[half]);
      *reinterpret_cast<unsigned*>(dst + n * 8) = packed;
    }
  }
}

}  // namespace

// Strides arrive as 12 scalars (q, k, v, out × batch, head, row) to keep the launch ABI plain.
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
