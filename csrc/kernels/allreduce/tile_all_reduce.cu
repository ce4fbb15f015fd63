// Tile-wise all-reduce consumers; the schedule is drawn in tile_all_reduce.h.
#include "kernels/allreduce/tile_all_reduce.h"

#include "distfuse/comm/handle.h"
#include "distfuse/comm/signal.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/gemm/tile_gemm.h"  // the GEMM's tile order (header only)

namespace distfuse {
namespace {

constexpr int kTileThreads = 512;

__host__ __device__ __forceinline__ int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ void wait_reached(const uint32_t* flag, uint32_t epoch,
                                             uint64_t timeout_ns, int tile, int peer) {
  wait_flag_reached(flag, epoch, timeout_ns, kOpMatmulAllReduce, "tile", tile, peer);
}

// Flag slots inside kChannelTiles: [0, kMaxTiles) ready (GEMM), then reduced (owner).
__device__ __forceinline__ uint32_t* ready_flag(const CommHandle& c, int rank, int t) {
  return c.flags(rank, kChannelTiles) + t;
}
__device__ __forceinline__ uint32_t* reduced_flag(const CommHandle& c, int rank, int t) {
  return c.flags(rank, kChannelTiles) + kMaxTiles + t;
}
// kChannelDecode: one flag per (tile, source rank) on the receiving rank.
__device__ __forceinline__ uint32_t* received_flag(const CommHandle& c, int rank, int t, int src) {
  return c.flags(rank, kChannelDecode) + int64_t(t) * kMaxWorld + src;
}

template <typename T>
__device__ __forceinline__ T* partial_of(const CommHandle& c, int rank) {
  return reinterpret_cast<T*>(c.peer_base[rank] + c.layout.tiles_offset);
}

// Owner mode: reduced slot k (tile t = k * W + owner) of `owner`, tile-local layout.
template <typename T>
__device__ __forceinline__ T* reduced_slot(const CommHandle& c, int owner, int64_t mn,
                                           int64_t tile_elems, int64_t k) {
  return partial_of<T>(c, owner) + mn + k * tile_elems;
}

// Push mode: receive slot of `src` on `dst` for one parity, same layout as D.
template <typename T>
__device__ __forceinline__ T* receive_slot(const CommHandle& c, int dst, int64_t mn, int parity,
                                           int src) {
  return partial_of<T>(c, dst) + mn + (int64_t(parity) * c.world + src) * mn;
}

template <typename T>
struct TileGeometry {
  static constexpr int kVec = 16 / sizeof(T);
  int64_t row0, col0;  // origin of the tile in D
  int rows, vecs;      // rows in the tile, 16-byte vectors per row

  __device__ TileGeometry(const TileAllReduceParams& p, int tm, int tn) {
    row0 = int64_t(tm) * p.tile_m;
    col0 = int64_t(tn) * p.tile_n;
    rows = min(int64_t(p.tile_m), p.m - row0);
    vecs = int(min(int64_t(p.tile_n), p.n - col0)) / kVec;
  }
  // Offset in D (ld = n) of vector i of the tile.
  __device__ __forceinline__ int64_t d_offset(int i, int n) const {
    return (row0 + i / vecs) * n + col0 + int64_t(i % vecs) * kVec;
  }
  // Column of D where vector i starts (its bias index).
  __device__ __forceinline__ int64_t bias_col(int i) const { return col0 + int64_t(i % vecs) * kVec; }
  // Offset of vector i in a dense tile_n-wide tile-local slot.
  __device__ __forceinline__ int64_t slot_offset(int i, int tile_n) const {
    return int64_t(i / vecs) * tile_n + int64_t(i % vecs) * kVec;
  }
};

// Σ over ranks 0..W-1 (in that order, fp32) of the 16-byte vectors at source(src),
// plus bias[col..] when given, rounded once. Every rank computes the same bits.
template <typename T, int W, typename Source>
__device__ __forceinline__ uint4 sum_in_rank_order(Source source, const T* bias, int64_t col) {
  constexpr int kVec = 16 / sizeof(T);
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
#pragma unroll
  for (int src = 0; src < W; ++src) accumulate<T, 16>(acc, to_pack<T>(load_cg(source(src))));
  if (bias) {
    const Pack<T, 16> b = to_pack<T>(load_plain(bias + col));
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += to_float(b.elem(e));
  }
  return from_pack<T>(round_pack<T, 16>(acc));
}

template <typename T, int W, bool kPush>
__global__ void __launch_bounds__(kTileThreads) tile_all_reduce_kernel(TileAllReduceParams p) {
  constexpr int kVec = 16 / sizeof(T);
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const int tiles_n = int(ceil_div64(p.n, p.tile_n));
  const int tiles_m = int(ceil_div64(p.m, p.tile_m));
  const int tiles = tiles_m * tiles_n;
  const int64_t mn = int64_t(p.m) * p.n;
  const int64_t tile_elems = int64_t(p.tile_m) * p.tile_n;
  T* out = static_cast<T*>(p.output);
  const T* bias = static_cast<const T*>(p.bias);
  uint32_t* seen = c.tile_seen();
  __shared__ uint32_t s_epoch;

  for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
    int tm, tn;
    tile_gemm_tile_coord(i, tiles_m, tiles_n, &tm, &tn);
    const int t = tm * tiles_n + tn;  // flag and counter index
    if (threadIdx.x == 0) s_epoch = seen[t] + 1;
    __syncthreads();
    const uint32_t epoch = s_epoch;
    const TileGeometry<T> g(p, tm, tn);
    const int count = g.rows * g.vecs;

    if constexpr (!kPush) {
      const int owner = i % W;
      if (rank == owner) {
        if (threadIdx.x < W) wait_reached(ready_flag(c, threadIdx.x, t), epoch, c.timeout_ns, t, threadIdx.x);
        __syncthreads();
        T* slot = reduced_slot<T>(c, rank, mn, tile_elems, i / W);
        for (int v = threadIdx.x; v < count; v += kTileThreads) {
          const int64_t off = g.d_offset(v, p.n);
          const uint4 r = sum_in_rank_order<T, W>(
              [&](int src) { return partial_of<T>(c, src) + off; }, bias, g.bias_col(v));
          store_plain(out + off, r);
          store_plain(slot + g.slot_offset(v, p.tile_n), r);
        }
        __syncthreads();
        if (threadIdx.x == 0) store_release_sys(reduced_flag(c, rank, t), epoch);
      } else {
        if (threadIdx.x == 0) wait_reached(reduced_flag(c, owner, t), epoch, c.timeout_ns, t, owner);
        __syncthreads();
        const T* slot = reduced_slot<T>(c, owner, mn, tile_elems, i / W);
        for (int v = threadIdx.x; v < count; v += kTileThreads)
          store_plain(out + g.d_offset(v, p.n), load_cg(slot + g.slot_offset(v, p.tile_n)));
      }
    } else {
      const int parity = epoch & 1;
      if (threadIdx.x == 0) wait_reached(ready_flag(c, rank, t), epoch, c.timeout_ns, t, rank);
      __syncthreads();
      const T* mine = partial_of<T>(c, rank);
      for (int v = threadIdx.x; v < count; v += kTileThreads) {
        const int64_t off = g.d_offset(v, p.n);
        const uint4 x = load_cg(mine + off);
#pragma unroll
        for (int k = 1; k < W; ++k) {
          const int dst = rank + k < W ? rank + k : rank + k - W;
          store_plain(receive_slot<T>(c, dst, mn, parity, rank) + off, x);
        }
      }
      __syncthreads();  // this block's pushes precede the releases below
      if (threadIdx.x < W && threadIdx.x != rank)
        store_release_sys(received_flag(c, threadIdx.x, t, rank), epoch);
      if (threadIdx.x < W && threadIdx.x != rank)
        wait_reached(received_flag(c, rank, t, threadIdx.x), epoch, c.timeout_ns, t, threadIdx.x);
      __syncthreads();
      for (int v = threadIdx.x; v < count; v += kTileThreads) {
        const int64_t off = g.d_offset(v, p.n);
        store_plain(out + off, sum_in_rank_order<T, W>(
                                   [&](int src) {
                                     return (src == rank ? mine : receive_slot<T>(c, rank, mn, parity, src)) + off;
                                   },
                                   bias, g.bias_col(v)));
      }
    }
    __syncthreads();  // the tile is done (and s_epoch read) before the counter moves
    if (threadIdx.x == 0) seen[t] = epoch;
  }
}

}  // namespace

uint64_t tile_region_bytes(TileReduceMode mode, int m, int n, int tile_m, int tile_n, int esize,
                           int world) {
  const uint64_t mn = uint64_t(m) * n;
  if (mode == TileReduceMode::kPush) return (mn + 2ull * world * mn) * esize;
  const uint64_t tiles = uint64_t(ceil_div64(m, tile_m)) * ceil_div64(n, tile_n);
  const uint64_t slots = (tiles + world - 1) / world;
  return (mn + slots * uint64_t(tile_m) * tile_n) * esize;
}

void* tile_partial(const CommHandle& c) { return c.peer_base[c.rank] + c.layout.tiles_offset; }

uint32_t* tile_ready_flags(const CommHandle& c) { return c.flags(c.rank, kChannelTiles); }

cudaError_t launch_tile_all_reduce(const TileAllReduceParams& p, TileReduceMode mode, int blocks,
                                   cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.dtype == DType::kFloat32 || p.n % 8 != 0 || p.tile_n % 8 != 0) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div64(p.m, p.tile_m) * ceil_div64(p.n, p.tile_n);
  if (tiles > kMaxTiles || (mode == TileReduceMode::kPush && tiles * kMaxWorld > int64_t(kFlagsPerChannel)))
    return cudaErrorInvalidValue;
  if (blocks <= 0 || blocks > tiles) blocks = int(std::min<int64_t>(tiles, blocks > 0 ? blocks : 16));
  return visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      return visit_world(p.comm.world, [&](auto w) {
        constexpr int W = decltype(w)::value;
        if (mode == TileReduceMode::kPush)
          tile_all_reduce_kernel<T, W, true><<<blocks, kTileThreads, 0, stream>>>(p);
        else
          tile_all_reduce_kernel<T, W, false><<<blocks, kTileThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
    }
  });
}

}  // namespace distfuse
