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

// Vectors each thread keeps in flight per source: loads over NVLink take
// microseconds, so a thread issues all loads of a batch before using any.
template <int W>
constexpr int kTileUnroll = W <= 2 ? 8 : W <= 4 ? 4 : 2;

// For the vectors v = base + u * kTileThreads (u < U, v < count) of one thread:
// Σ over ranks 0..W-1 (in that order, fp32) of the 16-byte vectors at
// source(src, v), plus bias at column bias_col(v) when given, rounded once,
// handed to sink(v, result). Every rank computes the same bits.
template <typename T, int W, int U, typename Source, typename BiasCol, typename Sink>
__device__ __forceinline__ void sum_batch_in_rank_order(int base, int count, Source source,
                                                        const T* bias, BiasCol bias_col, Sink sink) {
  constexpr int kVec = 16 / sizeof(T);
  uint4 x[U][W];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int v = base + u * kTileThreads;
#pragma unroll
    for (int src = 0; src < W; ++src)
      if (v < count) x[u][src] = load_cg(source(src, v));
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int v = base + u * kTileThreads;
    if (v >= count) continue;
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
#pragma unroll
    for (int src = 0; src < W; ++src) accumulate<T, 16>(acc, to_pack<T>(x[u][src]));
    if (bias) {
      const Pack<T, 16> b = to_pack<T>(load_plain(bias + bias_col(v)));
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += to_float(b.elem(e));
    }
    sink(v, from_pack<T>(round_pack<T, 16>(acc)));
  }
}

// Copies `count` vectors from(v) -> to(v), U loads in flight per thread.
template <int U, typename From, typename To>
__device__ __forceinline__ void copy_batched(int count, From from, To to) {
  for (int base = threadIdx.x; base < count; base += U * kTileThreads) {
    uint4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * kTileThreads < count) x[u] = load_cg(from(base + u * kTileThreads));
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * kTileThreads < count) to(base + u * kTileThreads, x[u]);
  }
}

struct TileIndex {
  int tm, tn, t;  // tile coordinates and flag / counter index tm * tiles_n + tn
};

__device__ __forceinline__ TileIndex tile_index(int i, int tiles_m, int tiles_n) {
  TileIndex x;
  tile_gemm_tile_coord(i, tiles_m, tiles_n, &x.tm, &x.tn);
  x.t = x.tm * tiles_n + x.tn;
  return x;
}

// Owner mode: see the diagram in tile_all_reduce.h.
template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads) tile_all_reduce_owner_kernel(TileAllReduceParams p) {
  constexpr int U = kTileUnroll<W>;
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
    const TileIndex x = tile_index(i, tiles_m, tiles_n);
    if (threadIdx.x == 0) s_epoch = seen[x.t] + 1;
    __syncthreads();
    const uint32_t epoch = s_epoch;
    const TileGeometry<T> g(p, x.tm, x.tn);
    const int count = g.rows * g.vecs;
    const int owner = i % W;
    if (rank == owner) {
      if (threadIdx.x < W) wait_reached(ready_flag(c, threadIdx.x, x.t), epoch, c.timeout_ns, x.t, threadIdx.x);
      __syncthreads();
      T* slot = reduced_slot<T>(c, rank, mn, tile_elems, i / W);
      for (int base = threadIdx.x; base < count; base += U * kTileThreads)
        sum_batch_in_rank_order<T, W, U>(
            base, count, [&](int src, int v) { return partial_of<T>(c, src) + g.d_offset(v, p.n); },
            bias, [&](int v) { return g.bias_col(v); },
            [&](int v, uint4 r) {
              store_plain(out + g.d_offset(v, p.n), r);
              store_plain(slot + g.slot_offset(v, p.tile_n), r);
            });
      __syncthreads();
      if (threadIdx.x == 0) store_release_sys(reduced_flag(c, rank, x.t), epoch);
    } else {
      if (threadIdx.x == 0) wait_reached(reduced_flag(c, owner, x.t), epoch, c.timeout_ns, x.t, owner);
      __syncthreads();
      const T* slot = reduced_slot<T>(c, owner, mn, tile_elems, i / W);
      copy_batched<2 * U>(
          count, [&](int v) { return slot + g.slot_offset(v, p.tile_n); },
          [&](int v, uint4 r) { store_plain(out + g.d_offset(v, p.n), r); });
    }
    __syncthreads();  // the tile is done (and s_epoch read) before the counter moves
    if (threadIdx.x == 0) seen[x.t] = epoch;
  }
}

// Push mode, in two passes over this block's tiles so that the transfers of all
// its tiles are in flight together: (1) as each tile becomes ready here, push it
// to every peer and raise the peers' flags; (2) wait for each tile's W-1 copies
// and sum. seen[t] moves only in pass 2, so both passes derive the same epoch.
template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads) tile_all_reduce_push_kernel(TileAllReduceParams p) {
  constexpr int U = kTileUnroll<W>;
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const int tiles_n = int(ceil_div64(p.n, p.tile_n));
  const int tiles_m = int(ceil_div64(p.m, p.tile_m));
  const int tiles = tiles_m * tiles_n;
  const int64_t mn = int64_t(p.m) * p.n;
  T* out = static_cast<T*>(p.output);
  const T* bias = static_cast<const T*>(p.bias);
  const T* mine = partial_of<T>(c, rank);
  uint32_t* seen = c.tile_seen();

  for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
    const TileIndex x = tile_index(i, tiles_m, tiles_n);
    const uint32_t epoch = seen[x.t] + 1;  // read by every thread; written in pass 2 only
    const int parity = epoch & 1;
    const TileGeometry<T> g(p, x.tm, x.tn);
    if (threadIdx.x == 0) wait_reached(ready_flag(c, rank, x.t), epoch, c.timeout_ns, x.t, rank);
    __syncthreads();
    copy_batched<2 * U>(
        g.rows * g.vecs, [&](int v) { return mine + g.d_offset(v, p.n); },
        [&](int v, uint4 r) {
          const int64_t off = g.d_offset(v, p.n);
#pragma unroll
          for (int k = 1; k < W; ++k) {
            const int dst = rank + k < W ? rank + k : rank + k - W;
            store_plain(receive_slot<T>(c, dst, mn, parity, rank) + off, r);
          }
        });
    __syncthreads();  // this block's pushes precede the releases below
    if (threadIdx.x < W && threadIdx.x != rank)
      store_release_sys(received_flag(c, threadIdx.x, x.t, rank), epoch);
  }
  for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
    const TileIndex x = tile_index(i, tiles_m, tiles_n);
    const uint32_t epoch = seen[x.t] + 1;
    const int parity = epoch & 1;
    const TileGeometry<T> g(p, x.tm, x.tn);
    const int count = g.rows * g.vecs;
    if (threadIdx.x < W && threadIdx.x != rank)
      wait_reached(received_flag(c, rank, x.t, threadIdx.x), epoch, c.timeout_ns, x.t, threadIdx.x);
    __syncthreads();
    for (int base = threadIdx.x; base < count; base += U * kTileThreads)
      sum_batch_in_rank_order<T, W, U>(
          base, count,
          [&](int src, int v) {
            return (src == rank ? mine : receive_slot<T>(c, rank, mn, parity, src)) + g.d_offset(v, p.n);
          },
          bias, [&](int v) { return g.bias_col(v); },
          [&](int v, uint4 r) { store_plain(out + g.d_offset(v, p.n), r); });
    __syncthreads();  // every thread read seen[t] before it moves
    if (threadIdx.x == 0) seen[x.t] = epoch;
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
          tile_all_reduce_push_kernel<T, W><<<blocks, kTileThreads, 0, stream>>>(p);
        else
          tile_all_reduce_owner_kernel<T, W><<<blocks, kTileThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
    }
  });
}

}  // namespace distfuse
