// Decode matmul_all_reduce kernel; the schedule is drawn in the header.
#include "kernels/gemm/decode_matmul_all_reduce.h"

#include <algorithm>

#include "distfuse/comm/handle.h"
#include "distfuse/comm/signal.cuh"
#include "kernels/common/launch.cuh"
#include "kernels/common/vec.cuh"

namespace distfuse {
namespace {

constexpr int kThreads = 256;
// K of one pipeline stage, a multiple of 64 (the probe sweeps it through this macro).
// 1 x H100 probe, GEMM alone, K = 2048 / 7168 / 14336, M = 32: 64-deep 18.1 / 51.7 / 97.7
// us, 128-deep 16.4 / 46.0 / 85.7, 256-deep 16.5 / 45.9 / 85.1 (M = 1: 1-3 % less).
#ifndef DF_DECODE_BLOCK_K
#define DF_DECODE_BLOCK_K 128
#endif
constexpr int kBlockK = DF_DECODE_BLOCK_K;
constexpr int kColumnGroups = 4;  // warps along the unit's columns (16 each)
// Swizzled smem rows: of K (weights of B transposed, tokens) kBlockK elements; of
// columns (weights of row-major B) the unit's 64.
constexpr int kKRowBytes = kBlockK * 2;
constexpr int kColumnRowBytes = kDecodeBlockN * 2;
static_assert(kBlockK % 64 == 0, "a stage is whole 64-deep K steps");
// Shared memory and depth of the cp.async ring (benchmarks/micro/decode_gemm_probe.cu
// sweeps them through these macros).
#ifndef DF_DECODE_MAX_SMEM_KB
#define DF_DECODE_MAX_SMEM_KB 200
#endif
#ifndef DF_DECODE_MAX_STAGES
#define DF_DECODE_MAX_STAGES 8
#endif
// Probe only (decode_gemm_probe.cu): 1 leaves out the token loads, 2 the weight loads,
// 3 both, to time what the rest of the K loop costs; the products are then garbage.
#ifndef DF_DECODE_PROBE_SKIP_LOADS
#define DF_DECODE_PROBE_SKIP_LOADS 0
#endif
constexpr int kMaxSmemBytes = DF_DECODE_MAX_SMEM_KB << 10;
constexpr int kMaxStages = DF_DECODE_MAX_STAGES;
static_assert(kDecodeBlockN == 16 * kColumnGroups, "one MMA row block per column group");
static_assert(kThreads == 32 * kColumnGroups * 2, "two K halves per stage");

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// kChannelDecodeGemm flags on rank `rank`: entry of `src`, and `src`'s partial of unit u landed.
__device__ __forceinline__ uint32_t* entry_flag(const CommHandle& c, int rank, int src) {
  return c.flags(rank, kChannelDecodeGemm) + src;
}
__device__ __forceinline__ uint32_t* received_flag(const CommHandle& c, int rank, int64_t u, int src) {
  return c.flags(rank, kChannelDecodeGemm) + kMaxWorld * (1 + u) + src;
}

// LL line of element offset `off` (a multiple of 4) of what `src` sent to `dst`.
__device__ __forceinline__ LLLine* ll_line(const CommHandle& c, int dst, int src, int64_t off) {
  return reinterpret_cast<LLLine*>(c.peer_base[dst] + c.layout.decode_ll_offset) + src * kDecodeLLLinesPerSlot +
         off / 4;
}

// LL128 line `line` of unit `u` that `src` sent to `dst` (every unit has room for the
// lines of a full one, `unit_lines`).
__device__ __forceinline__ unsigned char* ll128_line(const CommHandle& c, int dst, int src, int64_t u,
                                                     int64_t unit_lines, int64_t line) {
  return c.peer_base[dst] + c.layout.decode_ll_offset + c.world * (kDecodeLLLinesPerSlot * 16) +
         src * kDecodeLL128BytesPerSlot + (u * unit_lines + line) * int64_t(kLL128LineBytes);
}

// Byte offset of 16-byte chunk `chunk` of smem row `row` (rows of kRowBytes, 8 or more
// chunks): chunks are XOR-swizzled by the row so that the 8 rows an ldmatrix reads hit
// distinct banks.
template <int kRowBytes>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return uint32_t(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* global, bool valid) {
  // src-size 0 fills the 16 bytes with zeros (rows and K beyond the operands).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(global),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem));
}

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                           const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                    const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Shared-memory plan for kTokenTiles x 8 tokens per unit.
template <int kTokenTiles>
struct Smem {
  static constexpr int kTokens = 8 * kTokenTiles;
  static constexpr int kWeightBytes = kDecodeBlockN * kBlockK * 2;  // [64 columns][kBlockK] or [kBlockK][64 columns]
  static constexpr int kTokenBytes = kTokens * kKRowBytes;           // [tokens][kBlockK]
  static constexpr int kStageBytes = kWeightBytes + kTokenBytes;
  static constexpr int kStages =
      kMaxSmemBytes / kStageBytes < kMaxStages ? kMaxSmemBytes / kStageBytes : kMaxStages;
  // Epilogue (reuses the ring): fp32 partial sums of the second K half, and the
  // rounded unit [tokens][64 columns].
  static constexpr int kSumPitch = kDecodeBlockN + 4;  // floats; +4 avoids bank conflicts
  static constexpr int kSumBytes = kTokens * kSumPitch * 4;
  static constexpr int kOutBytes = kTokens * kDecodeBlockN * 2;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kStages >= 4, "pipeline too shallow");
  static_assert(kSumBytes + kOutBytes <= kBytes, "epilogue does not fit the ring");
};

// One unit's rows and columns.
struct Unit {
  int64_t index;
  int row0, rows;  // tokens [row0, row0 + rows)
  int col0, cols;  // columns [col0, col0 + cols), cols a multiple of 8
};

__device__ __forceinline__ Unit unit_of(const DecodeMatmulAllReduceParams& p, int64_t index) {
  const int64_t col_blocks = ceil_div(p.n, kDecodeBlockN);
  Unit u;
  u.index = index;
  u.row0 = int(index / col_blocks) * kDecodeBlockM;
  u.col0 = int(index % col_blocks) * kDecodeBlockN;
  u.rows = min(kDecodeBlockM, p.m - u.row0);
  u.cols = min(kDecodeBlockN, p.n - u.col0);
  return u;
}

template <typename T, int kTokenTiles, bool kBTransposed>
struct DecodeCta {
  using S = Smem<kTokenTiles>;
  const DecodeMatmulAllReduceParams& p;
  uint32_t smem;  // shared address of the ring
  unsigned char* smem_ptr;
  int warp, lane;

  // Issues the cp.async loads of stage `ks` (K offset ks * kBlockK) into ring slot `slot`.
  __device__ void load_stage(const Unit& u, int64_t ks, int slot) const {
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    const uint32_t weights = smem + slot * S::kStageBytes;
    const uint32_t tokens = weights + S::kWeightBytes;
    const int64_t k0 = ks * kBlockK;
    // Weights: a smem row is a column of out (B transposed: 64 rows of kBlockK) or a
    // K index (row-major B: kBlockK rows of 64 columns).
    constexpr int kWeightRowChunks = (kBTransposed ? kKRowBytes : kColumnRowBytes) / 16;
    if constexpr ((DF_DECODE_PROBE_SKIP_LOADS & 2) == 0)
    for (int i = threadIdx.x; i < kDecodeBlockN * kBlockK / 8; i += kThreads) {
      const int row = i / kWeightRowChunks, chunk = i % kWeightRowChunks;
      const T* src;
      bool valid;
      if constexpr (kBTransposed) {
        const int64_t n = u.col0 + row, k = k0 + chunk * 8;
        valid = n < p.n && k < p.k;
        src = b + n * p.ldb + k;
      } else {
        const int64_t k = k0 + row, n = u.col0 + chunk * 8;
        valid = k < p.k && n < p.n;
        src = b + k * p.ldb + n;
      }
      cp_async_16(weights + swizzled<kWeightRowChunks * 16>(row, chunk), valid ? src : b, valid);
    }
    constexpr int kTokenRowChunks = kKRowBytes / 16;
    if constexpr ((DF_DECODE_PROBE_SKIP_LOADS & 1) == 0)
    for (int i = threadIdx.x; i < S::kTokens * kTokenRowChunks; i += kThreads) {
      const int row = i / kTokenRowChunks, chunk = i % kTokenRowChunks;
      const int64_t k = k0 + chunk * 8;
      const bool valid = row < u.rows && k < p.k;
      const T* src = a + (u.row0 + row) * p.lda + k;
      cp_async_16(tokens + swizzled<kKRowBytes>(row, chunk), valid ? src : a, valid);
    }
  }

  // acc += this warp's 16 columns x all tokens over its half of stage slot `slot`.
  __device__ void compute_stage(int slot, float (&acc)[kTokenTiles][4]) const {
    const uint32_t weights = smem + slot * S::kStageBytes;
    const uint32_t tokens = weights + S::kWeightBytes;
    const int col = (warp % kColumnGroups) * 16;
    const int half = warp / kColumnGroups;
    const int i = lane >> 3, r = lane & 7;
#pragma unroll
    for (int step = 0; step < kBlockK / 32; ++step) {
      const int kk = half * (kBlockK / 2) + step * 16;
      uint32_t wf[4];
      if constexpr (kBTransposed) {  // smem [column][k]
        ldmatrix_x4(wf, weights + swizzled<kKRowBytes>(col + r + (i & 1) * 8, (kk >> 3) + (i >> 1)));
      } else {  // smem [k][column]: transposed on load
        ldmatrix_x4_trans(wf, weights + swizzled<kColumnRowBytes>(kk + r + (i >> 1) * 8, (col >> 3) + (i & 1)));
      }
      if constexpr (kTokenTiles == 1) {
        uint32_t tf[2];
        ldmatrix_x2(tf, tokens + swizzled<kKRowBytes>(r, (kk >> 3) + (i & 1)));
        mma_16x8x16<T>(acc[0], wf, tf);
      } else {
#pragma unroll
        for (int t = 0; t < kTokenTiles; t += 2) {
          uint32_t tf[4];
          ldmatrix_x4(tf, tokens + swizzled<kKRowBytes>((t + (i >> 1)) * 8 + r, (kk >> 3) + (i & 1)));
          const uint32_t lo[2] = {tf[0], tf[1]}, hi[2] = {tf[2], tf[3]};
          mma_16x8x16<T>(acc[t], wf, lo);
          mma_16x8x16<T>(acc[t + 1], wf, hi);
        }
      }
    }
  }

  // The unit's partial product, rounded to T, into smem [tokens][64 columns]
  // (returns its shared-memory pointer). Ends with a __syncthreads().
  __device__ const T* compute_unit(const Unit& u) const {
    float acc[kTokenTiles][4];
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

    const int64_t stages = ceil_div(p.k, kBlockK);
#pragma unroll
    for (int s = 0; s < S::kStages - 1; ++s) {
      if (s < stages) load_stage(u, s, s);
      cp_async_commit();
    }
    for (int64_t ks = 0; ks < stages; ++ks) {
      cp_async_wait<S::kStages - 2>();
      __syncthreads();  // stage ks landed for every thread; slot of ks - 1 is free
      const int64_t next = ks + S::kStages - 1;
      if (next < stages) load_stage(u, next, int(next % S::kStages));
      cp_async_commit();
      compute_stage(int(ks % S::kStages), acc);
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is free for the epilogue

    // C fragment: rows (columns of out) g and g + 8, tokens 2q and 2q + 1 of each tile.
    float* sums = reinterpret_cast<float*>(smem_ptr);
    T* out = reinterpret_cast<T*>(smem_ptr + S::kSumBytes);
    const int col = (warp % kColumnGroups) * 16 + (lane >> 2);
    const int tok = 2 * (lane & 3);
    if (warp >= kColumnGroups) {
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sums[(t * 8 + tok + (e & 1)) * S::kSumPitch + col + (e >> 1) * 8] = acc[t][e];
    }
    __syncthreads();
    if (warp < kColumnGroups) {
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = t * 8 + tok + (e & 1), c = col + (e >> 1) * 8;
          // The first K half plus the second: the K order is fixed, so every run agrees.
          out[row * kDecodeBlockN + c] = from_float<T>(acc[t][e] + sums[row * S::kSumPitch + c]);
        }
    }
    __syncthreads();
    return out;
  }
};

// kBytes (8 or 16) of elements at p, as one vector load or store.
template <typename T, int kBytes>
__device__ __forceinline__ Pack<T, kBytes> load_vector(const T* p) {
  Pack<T, kBytes> x;
  if constexpr (kBytes == 16) {
    x = to_pack<T>(load_plain(p));
  } else {
    const uint2 d = *reinterpret_cast<const uint2*>(p);
    x.w[0] = d.x;
    x.w[1] = d.y;
  }
  return x;
}
template <typename T, int kBytes>
__device__ __forceinline__ void store_vector(T* p, const Pack<T, kBytes>& x) {
  if constexpr (kBytes == 16) store_plain(p, from_pack<T>(x));
  else *reinterpret_cast<uint2*>(p) = make_uint2(x.w[0], x.w[1]);
}

// Σ in rank order (fp32) of the W partials of unit u, + bias, rounded once, into the
// output, kBytes of elements at a time: load(src, off) gives what rank src sent for
// element offset off (16 bytes from its slot, or 8 from its LL line once it landed).
template <typename T, int kBytes, typename Load>
__device__ void sum_unit(const DecodeMatmulAllReduceParams& p, const Unit& u, Load load) {
  using P = Pack<T, kBytes>;
  constexpr int kVec = P::kElems;
  const int vecs = u.cols / kVec;
  const int count = u.rows * vecs;
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.output);
  const int world = p.comm.world;
  for (int v = threadIdx.x; v < count; v += kThreads) {
    const int col = u.col0 + (v % vecs) * kVec;
    const int64_t off = int64_t(u.row0 + v / vecs) * p.n + col;
    P x[kMaxWorld];
#pragma unroll
    for (int src = 0; src < kMaxWorld; ++src)
      if (src < world) x[src] = load(src, off);
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
#pragma unroll
    for (int src = 0; src < kMaxWorld; ++src)
      if (src < world) accumulate<T, kBytes>(acc, x[src]);
    if (bias) {
      const P b = load_vector<T, kBytes>(bias + col);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += to_float(b.elem(e));
    }
    store_vector<T, kBytes>(out + off, round_pack<T, kBytes>(acc));
  }
}

// sum_unit for LL128 lines: 8 lanes per line, every warp reaching every vote (lanes
// past the unit's lines take part with valid = false).
template <typename T>
__device__ void sum_unit_ll128(const DecodeMatmulAllReduceParams& p, const Unit& u, uint32_t epoch) {
  using Word = Pack<T, 8>;
  const CommHandle& c = p.comm;
  const int wpr = u.cols / 4, words = u.rows * wpr, q = threadIdx.x % 8;
  const int64_t lines = decode_ll128_unit_lines(u.rows, u.cols);
  const int64_t unit_lines = decode_ll128_unit_lines(min(p.m, kDecodeBlockM), kDecodeBlockN);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.output);
  for (int64_t l0 = 0; l0 < lines; l0 += kThreads / 8) {
    const int64_t l = l0 + threadIdx.x / 8;
    const bool valid = l < lines;
    float acc[2][Word::kElems];
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
      for (int e = 0; e < Word::kElems; ++e) acc[k][e] = 0.f;
    for (int src = 0; src < c.world; ++src) {
      const ulonglong2 d = ll128_load_warp(ll128_line(c, c.rank, src, u.index, unit_lines, valid ? l : 0) + 16 * q,
                                           valid, q == 7, epoch, c.timeout_ns, p.op, int(u.index), src);
      accumulate<T, 8>(acc[0], word_from_bits<T>(d.x));
      accumulate<T, 8>(acc[1], word_from_bits<T>(d.y));
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int wi = int(l) * kLL128LineWords + 2 * q + k;
      if (!valid || (q == 7 && k == 1) || wi >= words) continue;
      const int col = u.col0 + (wi % wpr) * 4;
      if (bias) {
        const Word b = load_vector<T, 8>(bias + col);
#pragma unroll
        for (int e = 0; e < Word::kElems; ++e) acc[k][e] += to_float(b.elem(e));
      }
      store_vector<T, 8>(out + int64_t(u.row0 + wi / wpr) * p.n + col, round_pack<T, 8>(acc[k]));
    }
  }
}

template <typename T, int kTokenTiles, bool kBTransposed>
__global__ void __launch_bounds__(kThreads, 1) decode_matmul_all_reduce_kernel(DecodeMatmulAllReduceParams p) {
  extern __shared__ __align__(128) unsigned char ring[];
  const DecodeCta<T, kTokenTiles, kBTransposed> cta{p, uint32_t(__cvta_generic_to_shared(ring)), ring,
                                                   int(threadIdx.x) / 32, int(threadIdx.x) % 32};
  const CommHandle& c = p.comm;
  const int rank = c.rank, world = c.world;
  const int64_t units = decode_units(p.m, p.n);
  const int64_t mn = int64_t(p.m) * p.n;
  uint32_t* epoch_value = c.counters(kChannelDecodeGemm);
  const uint32_t epoch = p.all_reduce ? next_epoch(*epoch_value) : 0;
  const int src = int(threadIdx.x);  // the peer a thread < W signals or waits for
  const bool peer_thread = p.all_reduce && src < world && src != rank;

  if (peer_thread && blockIdx.x == 0) store_release_sys(entry_flag(c, src, rank), epoch);

  bool entered = false;
  for (int64_t i = blockIdx.x; i < units; i += gridDim.x) {
    const Unit u = unit_of(p, i);
    const T* partial = cta.compute_unit(u);
    const int vecs = u.cols / 8, count = u.rows * vecs;
    if (!p.all_reduce) {
      T* out = static_cast<T*>(p.output);
      for (int v = threadIdx.x; v < count; v += kThreads)
        store_plain(out + int64_t(u.row0 + v / vecs) * p.n + u.col0 + (v % vecs) * 8,
                    load_plain(partial + (v / vecs) * kDecodeBlockN + (v % vecs) * 8));
      __syncthreads();  // the smem unit is read before the next unit's ring reuses it
      continue;
    }
    if (!entered) {
      if (peer_thread)
        wait_flag_reached(entry_flag(c, rank, src), epoch, c.timeout_ns, p.op, "call entry", int(blockIdx.x), src);
      __syncthreads();
      entered = true;
    }
    if (p.ll128) {  // kLL128LineWords words per 128-byte line, written by 8 lanes at once; no release needed
      const int wpr = u.cols / 4, words = u.rows * wpr, q = threadIdx.x % 8;
      const int64_t lines = decode_ll128_unit_lines(u.rows, u.cols);
      const int64_t unit_lines = decode_ll128_unit_lines(min(p.m, kDecodeBlockM), kDecodeBlockN);
      for (int64_t l = threadIdx.x / 8; l < lines; l += kThreads / 8) {
        uint64_t w[2] = {0, 0};
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int wi = int(l) * kLL128LineWords + 2 * q + k;
          if ((q < 7 || k == 0) && wi < words)
            w[k] = *reinterpret_cast<const uint64_t*>(partial + (wi / wpr) * kDecodeBlockN + (wi % wpr) * 4);
        }
        if (q == 7) w[1] = epoch;
        for (int k = 0; k < world; ++k) {
          const int dst = rank + k < world ? rank + k : rank + k - world;
          ll128_store(ll128_line(c, dst, rank, i, unit_lines, l) + 16 * q, w[0], w[1]);
        }
      }
      __syncthreads();  // the smem unit is consumed before the next unit's ring reuses it
      continue;
    }
    if (p.ll) {  // 4 elements per line; data and epoch land together, no release needed
      const int lvecs = u.cols / 4;
      for (int v = threadIdx.x; v < u.rows * lvecs; v += kThreads) {
        const int64_t off = int64_t(u.row0 + v / lvecs) * p.n + u.col0 + (v % lvecs) * 4;
        const uint2 x = *reinterpret_cast<const uint2*>(partial + (v / lvecs) * kDecodeBlockN + (v % lvecs) * 4);
        for (int k = 0; k < world; ++k) {
          const int dst = rank + k < world ? rank + k : rank + k - world;
          ll_store(ll_line(c, dst, rank, off), x.x, x.y, epoch);
        }
      }
      __syncthreads();  // the smem unit is consumed before the next unit's ring reuses it
      continue;
    }
    for (int v = threadIdx.x; v < count; v += kThreads) {
      const int64_t off = int64_t(u.row0 + v / vecs) * p.n + u.col0 + (v % vecs) * 8;
      const uint4 x = load_plain(partial + (v / vecs) * kDecodeBlockN + (v % vecs) * 8);
      for (int k = 0; k < world; ++k) {  // own slot first, then the peers in ring order
        const int dst = rank + k < world ? rank + k : rank + k - world;
        T* slot = reinterpret_cast<T*>(c.peer_base[dst] + c.layout.tiles_offset) + (1 + rank) * mn;
        store_plain(slot + off, x);
      }
    }
    __syncthreads();  // every push of the unit precedes the releases; smem unit consumed
    if (peer_thread) store_release_sys(received_flag(c, src, i, rank), epoch);
  }
  if (!p.all_reduce) return;

  const T* slots = reinterpret_cast<const T*>(c.peer_base[rank] + c.layout.tiles_offset) + mn;
  for (int64_t i = blockIdx.x; i < units; i += gridDim.x) {
    const Unit u = unit_of(p, i);
    if (p.ll128) {
      sum_unit_ll128<T>(p, u, epoch);
      continue;
    }
    if (p.ll) {
      sum_unit<T, 8>(p, u, [&](int from, int64_t off) {
        const uint2 d = ll_load(ll_line(c, rank, from, off), epoch, c.timeout_ns, p.op, int(i), from);
        Pack<T, 8> x;
        x.w[0] = d.x;
        x.w[1] = d.y;
        return x;
      });
      continue;
    }
    if (peer_thread)
      wait_flag_reached(received_flag(c, rank, i, src), epoch, c.timeout_ns, p.op, "column block", int(i), src);
    __syncthreads();
    sum_unit<T, 16>(p, u, [&](int from, int64_t off) { return to_pack<T>(load_cg(slots + from * mn + off)); });
  }

  store_epoch_when_last(epoch_value, epoch_value + 1, epoch);
}

template <typename T, int kTokenTiles, bool kBTransposed>
cudaError_t launch_config(const DecodeMatmulAllReduceParams& p, int grid, cudaStream_t stream) {
  const auto kernel = decode_matmul_all_reduce_kernel<T, kTokenTiles, kBTransposed>;
  constexpr int kSmem = Smem<kTokenTiles>::kBytes;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, kSmem, stream, /*dependent=*/false, p);
}

template <typename T, int kTokenTiles>
cudaError_t launch_layout(const DecodeMatmulAllReduceParams& p, int grid, cudaStream_t stream) {
  return p.b_transposed ? launch_config<T, kTokenTiles, true>(p, grid, stream)
                        : launch_config<T, kTokenTiles, false>(p, grid, stream);
}

template <typename T>
cudaError_t launch_tokens(const DecodeMatmulAllReduceParams& p, int grid, cudaStream_t stream) {
  const int m = std::min(p.m, kDecodeBlockM);
  if (m <= 8) return launch_layout<T, 1>(p, grid, stream);
  if (m <= 16) return launch_layout<T, 2>(p, grid, stream);
  if (m <= 32) return launch_layout<T, 4>(p, grid, stream);
  if (m <= 64) return launch_layout<T, 8>(p, grid, stream);
  return launch_layout<T, 16>(p, grid, stream);
}

}  // namespace

bool decode_shape_supported(int64_t m, int64_t n, int64_t k) {
  return m >= 1 && n >= 8 && k >= 8 && n % 8 == 0 && k % 8 == 0 && m <= INT32_MAX && n <= INT32_MAX &&
         k <= INT32_MAX && kMaxWorld * (1 + decode_units(m, n)) <= int64_t(kFlagsPerChannel);
}

cudaError_t launch_decode_matmul_all_reduce(const DecodeMatmulAllReduceParams& p, cudaStream_t stream) {
  if (!decode_shape_supported(p.m, p.n, p.k) || !decode_operands_valid(p) ||
      (p.all_reduce && p.ll && uint64_t(p.m) * p.n * 2 > kDecodeLLCapacityBytes) ||
      (p.all_reduce && p.ll128 && !decode_ll128_fits(p.m, p.n)))
    return cudaErrorInvalidValue;
  const int grid = int(std::min<int64_t>(decode_units(p.m, p.n), p.sm_count));
  return p.dtype == DType::kBFloat16 ? launch_tokens<__nv_bfloat16>(p, grid, stream)
                                     : launch_tokens<__half>(p, grid, stream);
}

}  // namespace distfuse
