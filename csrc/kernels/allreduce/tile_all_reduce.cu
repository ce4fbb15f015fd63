// Tile-wise all-reduce consumers; the schedule is drawn in tile_all_reduce.h.
#include "kernels/allreduce/tile_all_reduce.h"

#include "distfuse/comm/handle.h"
#include "distfuse/comm/signal.cuh"
#include "kernels/allreduce/rank_order_sum.cuh"
#include "kernels/allreduce/tile_slots.cuh"
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

// Vectors each thread keeps in flight per source (sums) and for copies: a
// thread issues all loads of a batch before it uses any.
template <int W>
constexpr int kTileUnroll = W <= 2 ? 4 : W <= 4 ? 2 : 1;
constexpr int kCopyUnroll = 8;

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

// Waits (thread 0) until this rank's GEMM published tile x in this call, then
// records that (the GEMM bumps ready[t] once per call that has tile t).
__device__ __forceinline__ void wait_tile_ready(const CommHandle& c, const TileIndex& x) {
  if (threadIdx.x == 0) {
    uint32_t* seen = c.tile_seen() + x.t;
    const uint32_t expected = *seen + 1;
    wait_reached(ready_flag(c, c.rank, x.t), expected, c.timeout_ns, x.t, c.rank);
    *seen = expected;
  }
  __syncthreads();
}

struct TileShape {
  int tiles_m, tiles_n, tiles;
  int64_t mn;
  __device__ explicit TileShape(const TileAllReduceParams& p) {
    tiles_n = int(ceil_div64(p.n, p.tile_n));
    tiles_m = int(ceil_div64(p.m, p.tile_m));
    tiles = tiles_m * tiles_n;
    mn = int64_t(p.m) * p.n;
  }
};

// Number of tiles block `blockIdx.x` handles (tiles b, b + G, b + 2G, ...).
__device__ __forceinline__ int tiles_of_block(int tiles) {
  return tiles > int(blockIdx.x) ? (tiles - 1 - int(blockIdx.x)) / int(gridDim.x) + 1 : 0;
}
__device__ __forceinline__ int block_tile(int j) { return int(blockIdx.x) + j * int(gridDim.x); }

// What every consumer CTA of one call knows: shapes, pointers and the call epoch.
template <typename T, int W>
struct TileCall {
  const TileAllReduceParams& p;
  const CommHandle& c;
  int rank;
  TileShape s;
  T* out;
  const T* bias;
  const T* mine;  // this rank's partial D
  CallEpoch ce;
  uint32_t epoch;
  int parity;

  __device__ explicit TileCall(const TileAllReduceParams& params)
      : p(params), c(params.comm), rank(params.comm.rank), s(params),
        out(static_cast<T*>(params.output)), bias(static_cast<const T*>(params.bias)),
        mine(partial_of<T>(params.comm, params.comm.rank)), ce(call_epoch(params.comm)),
        epoch(next_epoch(*ce.value)), parity(int(epoch & 1)) {}

  // No byte goes to a peer before it entered this call (tile_all_reduce.h, entry).
  __device__ void enter() const { enter_call(c, kChannelTiles, kTileEntrySlot, epoch, kOpMatmulAllReduce); }
  // What `src` sent to `dst` in this call.
  __device__ T* slot(int dst, int src) const { return receive_slot<T>(c, dst, s.mn, parity, src); }
  // The k-th peer after this rank (1 <= k < W).
  __device__ int peer(int k) const { return rank + k < W ? rank + k : rank + k - W; }

  // Σ in rank order (+ bias) of this rank's tile and the copies every peer sent
  // here, once their flags arrived; each result goes to the output and to sink.
  template <typename Sink>
  __device__ void sum_received(const TileIndex& x, const TileGeometry<T>& g, Sink sink) const {
    constexpr int U = kTileUnroll<W>;
    const int count = g.rows * g.vecs;
    if (threadIdx.x < W && threadIdx.x != rank)
      wait_reached(received_flag(c, rank, x.t, threadIdx.x), epoch, c.timeout_ns, x.t, threadIdx.x);
    __syncthreads();
    for (int base = threadIdx.x; base < count; base += U * kTileThreads)
      sum_batch_in_rank_order<T, W, U, kTileThreads>(
          base, count,
          [&](int src, int v) { return (src == rank ? mine : slot(rank, src)) + g.d_offset(v, p.n); },
          bias, [&](int v) { return g.bias_col(v); },
          [&](int v, uint4 r) {
            const int64_t off = g.d_offset(v, p.n);
            store_plain(out + off, r);
            sink(off, r);
          });
  }
};

// Owner schedule; drawn in tile_all_reduce.h. A block walks its tiles
// in groups of p.group: a release at system scope waits until the block's pushes
// have landed, so one round of releases per group, not per tile.
template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads) tile_all_reduce_owner_kernel(TileAllReduceParams p) {
  const TileCall<T, W> call(p);
  call.enter();
  const CommHandle& c = call.c;
  const int rank = call.rank;
  const TileShape& s = call.s;
  const uint32_t epoch = call.epoch;
  const int group = max(1, min(p.group, kTileThreads));
  const int count_j = tiles_of_block(s.tiles);

  // Copies the reduced tiles the owners pushed here, for this block's tiles [ja, jb).
  auto copy_out = [&](int ja, int jb) {
    for (int j = ja; j < jb; ++j) {
      const int i = block_tile(j), owner = i % W;
      if (owner == rank) continue;
      const TileIndex x = tile_index(i, s.tiles_m, s.tiles_n);
      const TileGeometry<T> g(p, x.tm, x.tn);
      if (threadIdx.x == 0) wait_reached(received_flag(c, rank, x.t, owner), epoch, c.timeout_ns, x.t, owner);
      __syncthreads();
      const T* from = call.slot(rank, owner);
      copy_batched<kCopyUnroll>(
          g.rows * g.vecs, [&](int v) { return from + g.d_offset(v, p.n); },
          [&](int v, uint4 r) { store_plain(call.out + g.d_offset(v, p.n), r); });
    }
  };

  int prev_a = 0, prev_b = 0;  // the previous group, whose reduced tiles are collected now
  for (int ja = 0; ja < count_j; ja += group) {
    const int jb = min(ja + group, count_j);
    // 1. Push this rank's partial of the group's tiles that others own.
    for (int j = ja; j < jb; ++j) {
      const int i = block_tile(j), owner = i % W;
      if (owner == rank) continue;
      const TileIndex x = tile_index(i, s.tiles_m, s.tiles_n);
      const TileGeometry<T> g(p, x.tm, x.tn);
      wait_tile_ready(c, x);
      T* to = call.slot(owner, rank);
      copy_batched<kCopyUnroll>(
          g.rows * g.vecs, [&](int v) { return call.mine + g.d_offset(v, p.n); },
          [&](int v, uint4 r) { store_plain(to + g.d_offset(v, p.n), r); });
    }
    __syncthreads();  // the block's pushes precede the releases
    if (threadIdx.x < jb - ja) {
      const int i = block_tile(ja + threadIdx.x), owner = i % W;
      if (owner != rank)
        store_release_sys(received_flag(c, owner, tile_index(i, s.tiles_m, s.tiles_n).t, rank), epoch);
    }
    // 2. Reduce the group's tiles this rank owns and push the sums to every peer.
    for (int j = ja; j < jb; ++j) {
      const int i = block_tile(j);
      if (i % W != rank) continue;
      const TileIndex x = tile_index(i, s.tiles_m, s.tiles_n);
      const TileGeometry<T> g(p, x.tm, x.tn);
      wait_tile_ready(c, x);
      call.sum_received(x, g, [&](int64_t off, uint4 r) {
#pragma unroll
        for (int k = 1; k < W; ++k) store_plain(call.slot(call.peer(k), rank) + off, r);
      });
    }
    __syncthreads();  // the block's pushes precede the releases
    for (int q = threadIdx.x; q < (jb - ja) * (W - 1); q += kTileThreads) {
      const int i = block_tile(ja + q / (W - 1));
      if (i % W != rank) continue;
      const int dst = call.peer(q % (W - 1) + 1);
      store_release_sys(received_flag(c, dst, tile_index(i, s.tiles_m, s.tiles_n).t, rank), epoch);
    }
    // 3. Collect the previous group's sums (they had a group's time to arrive).
    copy_out(prev_a, prev_b);
    prev_a = ja;
    prev_b = jb;
  }
  copy_out(prev_a, prev_b);
  store_epoch_when_last(call.ce.value, call.ce.done, epoch);
}

}  // namespace

uint64_t tile_region_bytes(int m, int n, int esize, int world) {
  return tile_region_bytes_for_output(uint64_t(m) * n * esize, world);
}

int tile_all_reduce_max_tiles() { return int(kFlagsPerChannel / kMaxWorld); }

void* tile_partial(const CommHandle& c) { return c.peer_base[c.rank] + c.layout.tiles_offset; }

uint32_t* tile_ready_flags(const CommHandle& c) { return c.flags(c.rank, kChannelTiles); }

cudaError_t launch_tile_all_reduce(const TileAllReduceParams& p, int blocks, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.dtype == DType::kFloat32 || p.n % 8 != 0 || p.tile_n % 8 != 0) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div64(p.m, p.tile_m) * ceil_div64(p.n, p.tile_n);
  if (tiles > kMaxTiles || tiles > tile_all_reduce_max_tiles() || tiles < p.comm.world)
    return cudaErrorInvalidValue;
  if (blocks <= 0 || blocks > tiles) blocks = int(std::min<int64_t>(tiles, blocks > 0 ? blocks : 16));
  return visit_half_dtype_and_world(p.dtype, p.comm.world, [&](auto t, auto w) {
    using T = decltype(t);
    constexpr int W = decltype(w)::value;
    tile_all_reduce_owner_kernel<T, W><<<blocks, kTileThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace distfuse
