// One-shot (LL push) and two-shot (push reduce-scatter + all-gather; on LL or LL128
// lines at mid sizes) all-reduce.
// Schedules and memory ordering: all_reduce.h and distfuse/comm/signal.cuh.
#include "kernels/allreduce/all_reduce.h"

#include <algorithm>

#include "distfuse/comm/handle.h"
#include "distfuse/comm/signal.cuh"
#include "kernels/common/launch.cuh"
#include "kernels/common/vec.cuh"

namespace distfuse {
namespace {

template <typename I>
__host__ __device__ __forceinline__ I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// Adds bias[(idx + i) % period] to acc[i] for the elements that exist.
template <typename T, int kElems>
__device__ __forceinline__ void add_bias(float (&acc)[kElems], const T* bias, int64_t period,
                                         int64_t idx, int64_t n) {
  int64_t col = idx % period;
#pragma unroll
  for (int i = 0; i < kElems; ++i) {
    if (idx + i < n) acc[i] += to_float(bias[col]);
    col = col + 1 == period ? 0 : col + 1;
  }
}

// Line `line` (8 bytes of elements) of a tensor of n elements, the last one partial.
template <typename T>
__device__ __forceinline__ Pack<T, 8> load_line(const T* base, int64_t line, int64_t n) {
  const int64_t idx = line * Pack<T, 8>::kElems;
  return idx + Pack<T, 8>::kElems <= n ? *reinterpret_cast<const Pack<T, 8>*>(base + idx)
                                       : load_pack_tail<T, 8>(base, idx, n);
}
template <typename T>
__device__ __forceinline__ void store_line(T* base, int64_t line, int64_t n, const Pack<T, 8>& r) {
  const int64_t idx = line * Pack<T, 8>::kElems;
  if (idx + Pack<T, 8>::kElems <= n) *reinterpret_cast<Pack<T, 8>*>(base + idx) = r;
  else store_pack_tail<T, 8>(base, idx, n, r);
}

// Per-block epochs of the LL kernels: block b of a launch on `channel` uses the next
// epoch of its own counter, which it advances when it is done (the next call on the
// stream starts after this one ended, PDL included: every kernel waits first).
__device__ __forceinline__ uint32_t block_epoch_begin(const CommHandle& c, int channel) {
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = next_epoch(c.counters(channel)[blockIdx.x]);
  __syncthreads();
  return s_epoch;
}
__device__ __forceinline__ void block_epoch_end(const CommHandle& c, int channel, uint32_t epoch) {
  __syncthreads();  // every thread has read the epoch before the counter moves on
  if (threadIdx.x == 0) c.counters(channel)[blockIdx.x] = epoch;
}

// ---------------------------------------------------------------- one-shot

constexpr int kOneShotThreads = 512;

// The two CTA geometries: LPT lines per thread, each with its own channel (epoch
// counters) and its own part of the LL region.
template <int LPT>
struct OneShotGeometry {
  static constexpr int64_t kLinesPerBlock = int64_t(kOneShotThreads) * LPT;
  static constexpr int kChannel = LPT == 2 ? kChannelOneShot : kChannelOneShotFine;
  static constexpr int kRegion = LPT == 2 ? 0 : 1;
};

// Slot of lines that `src` pushes to `dst` for epochs of this parity. Within a
// geometry, block b always owns lines [b * kLinesPerBlock, (b + 1) * kLinesPerBlock):
// with the block's own epoch counter this is what makes the parity argument hold (a
// peer can be at most one epoch ahead of this block, so it never writes the parity
// we read).
template <int LPT>
__device__ __forceinline__ LLLine* one_shot_slot(const CommHandle& c, int dst, int parity,
                                                 int src) {
  return reinterpret_cast<LLLine*>(c.peer_base[dst] + c.layout.oneshot_offset) +
         ((int64_t(OneShotGeometry<LPT>::kRegion) * 2 + parity) * c.world + src) *
             int64_t(kOneShotLinesPerSlot);
}

// Σ in rank order of one LL line (8 payload bytes) over the W ranks: this rank's from
// `mine`, every peer's from the line `peer_line(src)` it sent here.
template <typename T, int W, typename PeerLine>
__device__ __forceinline__ void sum_ll_line_in_rank_order(float (&acc)[Pack<T, 8>::kElems], const Pack<T, 8>& mine,
                                                          int rank, PeerLine peer_line, uint32_t epoch,
                                                          uint64_t timeout_ns, int op) {
#pragma unroll
  for (int e = 0; e < Pack<T, 8>::kElems; ++e) acc[e] = 0.f;
#pragma unroll
  for (int src = 0; src < W; ++src) {
    Pack<T, 8> v = mine;
    if (src != rank) {
      const uint2 d = ll_load(peer_line(src), epoch, timeout_ns, op, blockIdx.x, src);
      v.w[0] = d.x;
      v.w[1] = d.y;
    }
    accumulate<T, 8>(acc, v);
  }
}

template <typename T, int W, int LPT>
__global__ void __launch_bounds__(kOneShotThreads)
    all_reduce_one_shot_kernel(AllReduceParams p) {
  wait_for_previous_kernel();
  using Geometry = OneShotGeometry<LPT>;
  using Line = Pack<T, 8>;
  constexpr int kElems = Line::kElems;
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const T* in = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.output);
  const int64_t n = p.numel;
  const int64_t lines = ceil_div<int64_t>(n, kElems);

  const uint32_t epoch = block_epoch_begin(c, Geometry::kChannel);
  const int parity = epoch & 1;

  Line mine[LPT];
  int64_t line[LPT];
#pragma unroll
  for (int k = 0; k < LPT; ++k) {
    line[k] = blockIdx.x * Geometry::kLinesPerBlock + k * kOneShotThreads + threadIdx.x;
    if (line[k] >= lines) continue;
    mine[k] = load_line(in, line[k], n);
#pragma unroll
    for (int i = 1; i < W; ++i) {
      const int dst = rank + i < W ? rank + i : rank + i - W;
      ll_store(one_shot_slot<LPT>(c, dst, parity, rank) + line[k], mine[k].w[0], mine[k].w[1], epoch);
    }
  }

#pragma unroll
  for (int k = 0; k < LPT; ++k) {
    if (line[k] >= lines) continue;
    float acc[kElems];
    sum_ll_line_in_rank_order<T, W>(
        acc, mine[k], rank, [&](int src) { return one_shot_slot<LPT>(c, rank, parity, src) + line[k]; }, epoch,
        c.timeout_ns, p.op);
    const int64_t idx = line[k] * kElems;
    if (p.bias) add_bias<T, kElems>(acc, static_cast<const T*>(p.bias), p.bias_period, idx, n);
    store_line(out, line[k], n, round_pack<T, 8>(acc));
  }

  block_epoch_end(c, Geometry::kChannel, epoch);
}

// ---------------------------------------------------------------- two-shot on LL lines

constexpr int kTwoShotLLThreads = 512;

// Lines `src` sends to `dst` in `phase` (0: a shard to its owner, 1: the owner's sum)
// for epochs of this parity. Thread t of block b always handles line j = b * threads
// + t of every shard, and each block keeps its own epoch counter: the parity
// argument of the one-shot holds for each phase (a peer reaches epoch e + 2 in
// block b only after it received this block's data of epoch e + 1, which this
// block sends after it finished reading epoch e).
__device__ __forceinline__ LLLine* two_shot_ll_slot(const CommHandle& c, int dst, int phase, int parity,
                                                    int src) {
  return reinterpret_cast<LLLine*>(c.peer_base[dst] + c.layout.twoshot_ll_offset) +
         ((int64_t(phase) * 2 + parity) * c.world + src) * int64_t(kTwoShotLLLinesPerSlot);
}

// Reduce-scatter then all-gather, every byte in LL lines (flag in the data, no
// fence and no barrier): the two-shot's traffic with the one-shot's latency.
//
//   thread (line j):  load line j of every shard ──LL──▶ its owner        (phase 0)
//   owner:            wait W-1 lines ─ Σ in rank order (+ bias) ─▶ out
//                     ──LL──▶ every peer                                   (phase 1)
//   every rank:       wait each owner's line j ─▶ out
//
// A thread reads every input position it later writes, so out may alias input.
template <typename T, int W>
__global__ void __launch_bounds__(kTwoShotLLThreads) all_reduce_two_shot_ll_kernel(AllReduceParams p) {
  wait_for_previous_kernel();
  using Line = Pack<T, 8>;
  constexpr int kElems = Line::kElems;
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const T* in = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.output);
  const int64_t n = p.numel;
  const int64_t lines = ceil_div<int64_t>(n, kElems);
  const int64_t shard = ceil_div<int64_t>(lines, W);  // lines per shard

  const uint32_t epoch = block_epoch_begin(c, kChannelTwoShotLL);
  const int parity = epoch & 1;
  const int64_t j = int64_t(blockIdx.x) * kTwoShotLLThreads + threadIdx.x;

  if (j < shard) {
    auto exists = [&](int owner) { return int64_t(owner) * shard + j < lines; };
    auto store_out = [&](int owner, const Line& r) { store_line(out, int64_t(owner) * shard + j, n, r); };
    Line x[W];  // line j of every shard, all loads issued first
#pragma unroll
    for (int s = 0; s < W; ++s)
      if (exists(s)) x[s] = load_line(in, int64_t(s) * shard + j, n);
#pragma unroll
    for (int i = 1; i < W; ++i) {
      const int dst = rank + i < W ? rank + i : rank + i - W;
      if (exists(dst)) ll_store(two_shot_ll_slot(c, dst, 0, parity, rank) + j, x[dst].w[0], x[dst].w[1], epoch);
    }
    if (exists(rank)) {
      float acc[kElems];
      sum_ll_line_in_rank_order<T, W>(
          acc, x[rank], rank, [&](int src) { return two_shot_ll_slot(c, rank, 0, parity, src) + j; }, epoch,
          c.timeout_ns, p.op);
      const int64_t idx = (int64_t(rank) * shard + j) * kElems;
      if (p.bias) add_bias<T, kElems>(acc, static_cast<const T*>(p.bias), p.bias_period, idx, n);
      const Line r = round_pack<T, 8>(acc);
#pragma unroll
      for (int i = 1; i < W; ++i) {
        const int dst = rank + i < W ? rank + i : rank + i - W;
        ll_store(two_shot_ll_slot(c, dst, 1, parity, rank) + j, r.w[0], r.w[1], epoch);
      }
      store_out(rank, r);
    }
#pragma unroll
    for (int i = 1; i < W; ++i) {
      const int src = rank + i < W ? rank + i : rank + i - W;
      if (!exists(src)) continue;
      const uint2 d =
          ll_load(two_shot_ll_slot(c, rank, 1, parity, src) + j, epoch, c.timeout_ns, p.op, blockIdx.x, src);
      Line v;
      v.w[0] = d.x;
      v.w[1] = d.y;
      store_out(src, v);
    }
  }

  block_epoch_end(c, kChannelTwoShotLL, epoch);
}

// ---------------------------------------------------------------- two-shot on LL128 lines

constexpr int kTwoShotLL128Threads = 256;
constexpr int kLL128LinesPerBlock = kTwoShotLL128Threads / 8;  // 8 lanes carry a line
// Grid: at most kLL128MaxBlocks blocks, kLL128BlocksPerSm of them per SM (comm/handle.h).

// Line `line` that `src` sends to `dst` in `phase` for epochs of this parity. Line j
// of every shard is always handled by the same 8 lanes of the same block (the map
// above), and each block keeps its own epoch counter: the LL two-shot's parity
// argument.
__device__ __forceinline__ unsigned char* two_shot_ll128_line(const CommHandle& c, int dst, int phase, int parity,
                                                             int src, int64_t line) {
  return c.peer_base[dst] + c.layout.twoshot_ll128_offset +
         (((int64_t(phase) * 2 + parity) * c.world + src) * int64_t(kTwoShotLL128LinesPerSlot) + line) *
             int64_t(kLL128LineBytes);
}

// Σ in rank order of this lane's two words of one LL128 line over the W ranks: this
// rank's words from `mine`, every peer's from the line `peer_line(src)` it sent here.
// Every lane of the warp calls it (ll128_load_warp votes across the warp).
template <typename T, int W, typename PeerLine>
__device__ __forceinline__ void sum_ll128_line_in_rank_order(float (&acc)[2][Pack<T, 8>::kElems],
                                                             const Pack<T, 8> (&mine)[2], int rank,
                                                             PeerLine peer_line, bool valid, bool flag_lane,
                                                             uint64_t flag, uint64_t timeout_ns, int op) {
#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int e = 0; e < Pack<T, 8>::kElems; ++e) acc[k][e] = 0.f;
#pragma unroll
  for (int src = 0; src < W; ++src) {
    Pack<T, 8> v[2] = {mine[0], mine[1]};
    if (src != rank) {
      const ulonglong2 d = ll128_load_warp(peer_line(src), valid, flag_lane, flag, timeout_ns, op, blockIdx.x, src);
      v[0] = word_from_bits<T>(d.x);
      v[1] = word_from_bits<T>(d.y);
    }
    accumulate<T, 8>(acc[0], v[0]);
    accumulate<T, 8>(acc[1], v[1]);
  }
}

// The LL two-shot's schedule with 128-byte lines of 15 payload words and a flag word
// (120 of every 128 bytes are data, against 8 of 16 for LL lines). Lane q of a group
// of 8 carries words 2q and 2q + 1 of its line; lane 7 carries word 14 and the flag.
//
//   group (line j):  load line j of every shard ──LL128──▶ its owner            (phase 0)
//   owner:           wait W-1 lines ─ Σ in rank order (+ bias) ─▶ out
//                    ──LL128──▶ every peer                                      (phase 1)
//   every rank:      wait each owner's line j ─▶ out
//
// Every lane of a warp reaches each ll128_load_warp (its vote spans the warp), so
// lanes without a line take part with valid = false instead of branching around.
// A group reads every input word it later writes, so out may alias input.
template <typename T, int W>
__global__ void __launch_bounds__(kTwoShotLL128Threads, kLL128BlocksPerSm)
    all_reduce_two_shot_ll128_kernel(AllReduceParams p) {
  wait_for_previous_kernel();
  using Word = Pack<T, 8>;
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const T* in = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.output);
  const int64_t n = p.numel;
  const int64_t words = ceil_div<int64_t>(n, Word::kElems);
  const int64_t shard_lines = ceil_div<int64_t>(ceil_div<int64_t>(words, W), kLL128LineWords);
  const int64_t shard = shard_lines * kLL128LineWords;  // words per shard

  const uint32_t epoch = block_epoch_begin(c, kChannelTwoShotLL128);
  const int parity = epoch & 1;
  const uint64_t flag = epoch;

  const int q = threadIdx.x & 7;
  const bool flag_lane = q == 7;
  const int my_words = flag_lane ? 1 : 2;
  // Block-uniform trip count: every lane reaches every warp vote.
  for (int64_t chunk = blockIdx.x; chunk * kLL128LinesPerBlock < shard_lines; chunk += kLL128MaxBlocks) {
    const int64_t j = chunk * kLL128LinesPerBlock + threadIdx.x / 8;
    const bool has_line = j < shard_lines;
    const int64_t first_word = j * kLL128LineWords + 2 * q;
    auto word_index = [&](int s, int k) { return int64_t(s) * shard + first_word + k; };
    auto exists = [&](int s, int k) { return has_line && k < my_words && word_index(s, k) < words; };
    auto line_part = [&](int dst, int phase, int src) {
      return two_shot_ll128_line(c, dst, phase, parity, src, j) + 16 * q;
    };

    // This lane's words of line j of every shard, all loads issued first (arrays
    // indexed by unrolled loop counters only, so they stay in registers).
    Word mine[2], send[W - 1][2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      mine[k] = exists(rank, k) ? load_line(in, word_index(rank, k), n) : Word{};
#pragma unroll
      for (int i = 1; i < W; ++i) {
        const int dst = rank + i < W ? rank + i : rank + i - W;
        send[i - 1][k] = exists(dst, k) ? load_line(in, word_index(dst, k), n) : Word{};
      }
    }
    if (has_line) {
#pragma unroll
      for (int i = 1; i < W; ++i) {
        const int dst = rank + i < W ? rank + i : rank + i - W;
        ll128_store(line_part(dst, 0, rank), word_bits(send[i - 1][0]), flag_lane ? flag : word_bits(send[i - 1][1]));
      }
    }

    float acc[2][Word::kElems];
    sum_ll128_line_in_rank_order<T, W>(acc, mine, rank, [&](int src) { return line_part(rank, 0, src); }, has_line,
                                       flag_lane, flag, c.timeout_ns, p.op);
    Word r[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (p.bias)
        add_bias<T, Word::kElems>(acc[k], static_cast<const T*>(p.bias), p.bias_period,
                                  word_index(rank, k) * Word::kElems, n);
      r[k] = round_pack<T, 8>(acc[k]);
    }
    if (has_line) {
#pragma unroll
      for (int i = 1; i < W; ++i) {
        const int dst = rank + i < W ? rank + i : rank + i - W;
        ll128_store(line_part(dst, 1, rank), word_bits(r[0]), flag_lane ? flag : word_bits(r[1]));
      }
    }
#pragma unroll
    for (int k = 0; k < 2; ++k)
      if (exists(rank, k)) store_line(out, word_index(rank, k), n, r[k]);

#pragma unroll
    for (int i = 1; i < W; ++i) {
      const int src = rank + i < W ? rank + i : rank + i - W;
      const ulonglong2 d =
          ll128_load_warp(line_part(rank, 1, src), has_line, flag_lane, flag, c.timeout_ns, p.op, blockIdx.x, src);
      if (exists(src, 0)) store_line(out, word_index(src, 0), n, word_from_bits<T>(d.x));
      if (exists(src, 1)) store_line(out, word_index(src, 1), n, word_from_bits<T>(d.y));
    }
  }

  block_epoch_end(c, kChannelTwoShotLL128, epoch);
}

// ---------------------------------------------------------------- one-shot on LL128 lines

// Every rank pushes its whole input on LL128 lines to every peer and sums the W copies
// itself: one hop instead of the two-shot's two. At W = 2 both carry the same bytes
// (the input once each way), so the hop saved is the whole difference; at W > 2 the
// one-shot carries (W-1)/2 times the two-shot's bytes and pays off only where the
// call is latency-bound.
//
//   group (slot line i):  load input lines i and i + L ──LL128──▶ every peer
//                         (every line chunk of the block first, then)
//                         wait W-1 copies of each ─ Σ in rank order (+ bias) ─▶ out
//
// It runs in the two-shot's LL128 region and on its epoch counters: input line
// i + h·L goes to the slot line i of "phase" h, and slot line i is handled by the
// same block as in the two-shot (chunk i / 32 on block chunk mod 256), so the parity
// argument holds across calls of both kernels (in each, every block waits for lines
// from every peer before it ends). L = kTwoShotLL128LinesPerSlot: the second set of
// slot lines is used only beyond 2.1 MB.

template <typename T, int W>
__global__ void __launch_bounds__(kTwoShotLL128Threads, kLL128BlocksPerSm)
    all_reduce_one_shot_ll128_kernel(AllReduceParams p) {
  wait_for_previous_kernel();
  using Word = Pack<T, 8>;
  constexpr int64_t kSlotLines = int64_t(kTwoShotLL128LinesPerSlot);
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const T* in = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.output);
  const int64_t n = p.numel;
  const int64_t words = ceil_div<int64_t>(n, Word::kElems);
  const int64_t lines = ceil_div<int64_t>(words, kLL128LineWords);
  const int64_t slot_lines = lines < kSlotLines ? lines : kSlotLines;
  const int halves = lines > kSlotLines ? 2 : 1;  // call-uniform

  const uint32_t epoch = block_epoch_begin(c, kChannelTwoShotLL128);
  const int parity = epoch & 1;
  const uint64_t flag = epoch;

  const int q = threadIdx.x & 7;
  const bool flag_lane = q == 7;
  const int my_words = flag_lane ? 1 : 2;
  auto has_line = [&](int64_t i, int h) { return i < slot_lines && i + h * kSlotLines < lines; };
  auto word_index = [&](int64_t i, int h, int k) { return (i + h * kSlotLines) * kLL128LineWords + 2 * q + k; };
  auto exists = [&](int64_t i, int h, int k) {
    return has_line(i, h) && k < my_words && word_index(i, h, k) < words;
  };
  auto line_part = [&](int dst, int h, int src, int64_t i) {
    return two_shot_ll128_line(c, dst, h, parity, src, i) + 16 * q;
  };
  auto load_mine = [&](int64_t i, int h, int k) { return exists(i, h, k) ? load_line(in, word_index(i, h, k), n) : Word{}; };

  // Every line of the block is pushed before the first wait, so a block that walks
  // several line chunks pays one round trip, not one per chunk.
  for (int64_t chunk = blockIdx.x; chunk * kLL128LinesPerBlock < slot_lines; chunk += kLL128MaxBlocks) {
    const int64_t i = chunk * kLL128LinesPerBlock + threadIdx.x / 8;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!has_line(i, h)) continue;
      const Word w0 = load_mine(i, h, 0), w1 = load_mine(i, h, 1);
#pragma unroll
      for (int s = 1; s < W; ++s) {
        const int dst = rank + s < W ? rank + s : rank + s - W;
        ll128_store(line_part(dst, h, rank, i), word_bits(w0), flag_lane ? flag : word_bits(w1));
      }
    }
  }

  // The sums, this rank's words read again (a group reads the input words it writes
  // before it writes them, so out may alias input).
  for (int64_t chunk = blockIdx.x; chunk * kLL128LinesPerBlock < slot_lines; chunk += kLL128MaxBlocks) {
    const int64_t i = chunk * kLL128LinesPerBlock + threadIdx.x / 8;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h >= halves) break;  // call-uniform: every lane reaches every warp vote
      const Word mine[2] = {load_mine(i, h, 0), load_mine(i, h, 1)};
      float acc[2][Word::kElems];
      sum_ll128_line_in_rank_order<T, W>(acc, mine, rank, [&](int src) { return line_part(rank, h, src, i); },
                                         has_line(i, h), flag_lane, flag, c.timeout_ns, p.op);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (!exists(i, h, k)) continue;
        if (p.bias)
          add_bias<T, Word::kElems>(acc[k], static_cast<const T*>(p.bias), p.bias_period,
                                    word_index(i, h, k) * Word::kElems, n);
        store_line(out, word_index(i, h, k), n, round_pack<T, 8>(acc[k]));
      }
    }
  }

  block_epoch_end(c, kChannelTwoShotLL128, epoch);
}

// ---------------------------------------------------------------- two-shot

constexpr int kTwoShotThreads = 512;
constexpr int kTwoShotUnroll = 4;  // 16-byte vectors in flight per thread

// Data `src` pushes to `dst` in `phase` for block `block`, in slot `slot`: each
// block double-buffers its steps (slot = step epoch & 1) so that step s+1's
// pushes overlap step s's last phase. Blocks own consecutive chunk_bytes pieces.
__device__ __forceinline__ unsigned char* two_shot_region(const CommHandle& c, int dst, int phase,
                                                          int slot, int src, int block,
                                                          int64_t chunk_bytes) {
  return c.peer_base[dst] + c.layout.twoshot_offset +
         int64_t((phase * kTwoShotSlots + slot) * c.world + src) * kTwoShotRegionBytes +
         block * chunk_bytes;
}

__device__ __forceinline__ uint32_t* two_shot_flag(const CommHandle& c, int owner, int phase,
                                                   int block, int src) {
  return c.flags(owner, kChannelTwoShot) + (int64_t(phase) * kMaxBlocks + block) * kMaxWorld + src;
}

// Copies `len` elements; both pointers 16-byte aligned. Sources written by a
// peer are read with ld.global.cg (L2 only): this block read the same addresses
// in an earlier step, and L1 is not coherent with NVLink writes.
template <typename T, bool kSourceFromPeer>
__device__ __forceinline__ void copy_elems(T* dst, const T* src, int64_t len) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t full = len / kVec;
  for (int64_t base = threadIdx.x; base < full; base += int64_t(kTwoShotUnroll) * kTwoShotThreads) {
    uint4 v[kTwoShotUnroll];
#pragma unroll
    for (int u = 0; u < kTwoShotUnroll; ++u) {
      const int64_t i = base + int64_t(u) * kTwoShotThreads;
      if (i < full) v[u] = kSourceFromPeer ? load_cg(src + i * kVec) : load_plain(src + i * kVec);
    }
#pragma unroll
    for (int u = 0; u < kTwoShotUnroll; ++u) {
      const int64_t i = base + int64_t(u) * kTwoShotThreads;
      if (i < full) store_plain(dst + i * kVec, v[u]);
    }
  }
  // The partial vector at the end: a peer-written source is read as one whole vector
  // from L2 (the regions are padded to 16 bytes), a local one element by element.
  if (threadIdx.x == 0 && full * kVec < len) {
    if (kSourceFromPeer) store_pack_tail<T, 16>(dst, full * kVec, len, to_pack<T>(load_cg(src + full * kVec)));
    else
      for (int64_t i = full * kVec; i < len; ++i) dst[i] = src[i];
  }
}

// Elements of shard `s` (of `shard` elements) that chunk offset `off` covers.
__device__ __forceinline__ int64_t chunk_len(int s, int64_t shard, int64_t off, int64_t chunk,
                                             int64_t n) {
  const int64_t begin = int64_t(s) * shard + off;
  const int64_t end = min(min(begin + chunk, int64_t(s + 1) * shard), n);
  return end > begin ? end - begin : 0;
}

template <int W>
__device__ __forceinline__ void signal_peers(const CommHandle& c, int phase, uint32_t epoch) {
  __syncthreads();  // this block's pushes precede the release (cumulativity)
  const int t = threadIdx.x;
  if (t < W && t != c.rank) store_release_sys(two_shot_flag(c, t, phase, blockIdx.x, c.rank), epoch);
}

// Flags are step counters: a peer may already be one step further (it then wrote
// the other slot), hence "reached" rather than "equal".
template <int W>
__device__ __forceinline__ void wait_peers(const CommHandle& c, int phase, uint32_t epoch, int op) {
  const int t = threadIdx.x;
  if (t < W && t != c.rank)
    wait_flag_reached(two_shot_flag(c, c.rank, phase, blockIdx.x, t), epoch, c.timeout_ns, op,
                      "block", blockIdx.x, t);
  __syncthreads();
}

struct TwoShotShape {
  int64_t n, shard, chunk;
};

// Vector e (elements [e, e + kVec) of the `mine` elements at `begin`) of the rank-order
// sum (+ bias): this rank's own part comes from `own`, rank src's from
// `peer_chunk(src)`, memory a peer wrote (the regions are padded to 16 bytes, so a
// whole vector is read, from L2: L1 is not coherent with NVLink writes, and a plain
// load of the tail could hit a line cached in an earlier step). Every source's load
// is issued before the sum.
template <typename T, int W, typename PeerChunk>
__device__ __forceinline__ Pack<T, 16> sum_chunk_vector(const AllReduceParams& p, const T* own, int64_t e,
                                                        int64_t mine, int64_t begin, PeerChunk peer_chunk) {
  constexpr int kVec = 16 / sizeof(T);
  const int rank = p.comm.rank;
  const bool full = e + kVec <= mine;
  Pack<T, 16> x[W];
#pragma unroll
  for (int src = 0; src < W; ++src) {
    if (src != rank) x[src] = to_pack<T>(load_cg(peer_chunk(src) + e));
    else x[src] = full ? to_pack<T>(load_plain(own + e)) : load_pack_tail<T, 16>(own, e, mine);
  }
  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
#pragma unroll
  for (int src = 0; src < W; ++src) accumulate<T, 16>(acc, x[src]);
  if (p.bias) add_bias<T, kVec>(acc, static_cast<const T*>(p.bias), p.bias_period, begin + e, begin + mine);
  return round_pack<T, 16>(acc);
}

// Phase 1 of the step with epoch `e` at chunk offset `off`: every peer's sum of its
// shard's chunk lands in this rank's output.
template <typename T, int W>
__device__ __forceinline__ void two_shot_gather(const CommHandle& c, T* out, const TwoShotShape& s,
                                                int64_t off, uint32_t e, int op) {
  wait_peers<W>(c, 1, e, op);
#pragma unroll 1
  for (int i = 1; i < W; ++i) {
    const int src = c.rank + i < W ? c.rank + i : c.rank + i - W;
    copy_elems<T, true>(out + int64_t(src) * s.shard + off,
                        reinterpret_cast<const T*>(two_shot_region(c, c.rank, 1, e & 1, src, blockIdx.x, s.chunk * int64_t(sizeof(T)))),
                        chunk_len(src, s.shard, off, s.chunk, s.n));
  }
}

// Step s of block b covers chunk j = b + s * gridDim.x of every shard:
//
//   push chunk j of shard p to p (phase 0) ─┐
//   finish step s-1: wait phase-1 flags,    │ overlapped with the phase-0 transfer
//     copy peers' sums of step s-1 out      ┘
//   wait phase-0 flags, sum own chunk in rank order (+ bias), write it,
//   push the sum to every peer (phase 1)
//
// Slot reuse is safe with two slots: a rank pushes phase 0 of step s+2 only after
// it finished step s+1, whose phase-1 flags the peer raised after reading step s's
// phase-0 data; and the peer pushes phase 1 of step s+2 only after this rank's
// phase-0 push of step s+2, which follows this rank's copy-out of step s.
template <typename T, int W>
__global__ void __launch_bounds__(kTwoShotThreads)
    all_reduce_two_shot_kernel(AllReduceParams p, int64_t chunk) {
  wait_for_previous_kernel();
  constexpr int kVec = 16 / sizeof(T);
  using Vec = Pack<T, 16>;
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const T* in = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.output);
  TwoShotShape s;
  s.n = p.numel;
  s.shard = ceil_div<int64_t>(ceil_div<int64_t>(s.n, W), kVec) * kVec;
  s.chunk = chunk;
  const int64_t chunk_bytes = chunk * int64_t(sizeof(T));
  const int64_t chunks = ceil_div<int64_t>(s.shard, chunk);

  __shared__ uint32_t s_epoch;
  uint32_t* counter = c.counters(kChannelTwoShot) + blockIdx.x;
  if (threadIdx.x == 0) s_epoch = *counter;
  __syncthreads();
  uint32_t epoch = s_epoch;
  uint32_t prev_epoch = 0;
  int64_t prev_off = -1;

  for (int64_t j = blockIdx.x; j < chunks; j += gridDim.x) {
    epoch = next_epoch(epoch);
    const int slot = epoch & 1;
    const int64_t off = j * chunk;

#pragma unroll 1
    for (int i = 1; i < W; ++i) {
      const int dst = rank + i < W ? rank + i : rank + i - W;
      copy_elems<T, false>(reinterpret_cast<T*>(two_shot_region(c, dst, 0, slot, rank, blockIdx.x, chunk_bytes)),
                           in + int64_t(dst) * s.shard + off, chunk_len(dst, s.shard, off, chunk, s.n));
    }
    signal_peers<W>(c, 0, epoch);
    if (prev_off >= 0) two_shot_gather<T, W>(c, out, s, prev_off, prev_epoch, p.op);
    wait_peers<W>(c, 0, epoch, p.op);

    const int64_t mine = chunk_len(rank, s.shard, off, chunk, s.n);
    const int64_t begin = int64_t(rank) * s.shard + off;
    for (int64_t v = threadIdx.x; v * kVec < mine; v += kTwoShotThreads) {
      const int64_t e = v * kVec;
      const bool full = e + kVec <= mine;
      const Vec r = sum_chunk_vector<T, W>(p, in + begin, e, mine, begin, [&](int src) {
        return reinterpret_cast<const T*>(two_shot_region(c, rank, 0, slot, src, blockIdx.x, chunk_bytes));
      });
      if (full) store_plain(out + begin + e, from_pack<T>(r));
      else store_pack_tail<T, 16>(out + begin, e, mine, r);
#pragma unroll
      for (int i = 1; i < W; ++i) {
        const int dst = rank + i < W ? rank + i : rank + i - W;
        T* to = reinterpret_cast<T*>(two_shot_region(c, dst, 1, slot, rank, blockIdx.x, chunk_bytes));
        if (full) store_plain(to + e, from_pack<T>(r));
        else store_pack_tail<T, 16>(to, e, mine, r);
      }
    }
    signal_peers<W>(c, 1, epoch);
    prev_off = off;
    prev_epoch = epoch;
  }
  if (prev_off >= 0) two_shot_gather<T, W>(c, out, s, prev_off, epoch, p.op);

  __syncthreads();
  if (threadIdx.x == 0) *counter = epoch;
}

}  // namespace

int64_t all_reduce_one_shot_max_numel(DType dtype) {
  return int64_t(kOneShotCapacityBytes) / dtype_size(dtype);
}

cudaError_t launch_all_reduce_one_shot(const AllReduceParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const int esize = dtype_size(p.dtype);
  const int64_t lines = ceil_div<int64_t>(p.numel * esize, 8);
  if (lines > int64_t(kOneShotLinesPerSlot)) return cudaErrorInvalidValue;
  const bool fine = p.one_shot_lines_per_thread == 1;
  const int64_t per_block = fine ? OneShotGeometry<1>::kLinesPerBlock : OneShotGeometry<2>::kLinesPerBlock;
  const int blocks = static_cast<int>(ceil_div<int64_t>(lines, per_block));
  if (blocks > kMaxBlocks) return cudaErrorInvalidValue;
  return visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return visit_world(p.comm.world, [&](auto w) {
      constexpr int W = decltype(w)::value;
      return fine ? launch_kernel(all_reduce_one_shot_kernel<T, W, 1>, blocks, kOneShotThreads, 0, stream,
                           p.dependent_launch, p)
                  : launch_kernel(all_reduce_one_shot_kernel<T, W, 2>, blocks, kOneShotThreads, 0, stream,
                           p.dependent_launch, p);
    });
  });
}

int64_t all_reduce_two_shot_ll_max_numel(DType dtype, int world) {
  return int64_t(kTwoShotLLShardBytes) * world / dtype_size(dtype);
}

cudaError_t launch_all_reduce_two_shot_ll(const AllReduceParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const int world = p.comm.world;
  const int64_t lines = ceil_div<int64_t>(p.numel * dtype_size(p.dtype), 8);
  const int64_t shard = ceil_div<int64_t>(lines, world);
  if (shard > int64_t(kTwoShotLLLinesPerSlot)) return cudaErrorInvalidValue;
  const int blocks = static_cast<int>(ceil_div<int64_t>(shard, kTwoShotLLThreads));
  if (blocks > kMaxBlocks) return cudaErrorInvalidValue;
  return visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return visit_world(world, [&](auto w) {
      return launch_kernel(all_reduce_two_shot_ll_kernel<T, decltype(w)::value>, blocks, kTwoShotLLThreads, 0, stream,
                    p.dependent_launch, p);
    });
  });
}

int64_t all_reduce_two_shot_ll128_max_numel(DType dtype, int world) {
  return int64_t(two_shot_ll128_capacity_bytes(world)) / dtype_size(dtype);
}

cudaError_t launch_all_reduce_two_shot_ll128(const AllReduceParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const int world = p.comm.world;
  const int64_t words = ceil_div<int64_t>(p.numel * dtype_size(p.dtype), 8);
  const int64_t shard_lines = ceil_div<int64_t>(ceil_div<int64_t>(words, world), kLL128LineWords);
  if (shard_lines > int64_t(kTwoShotLL128LinesPerSlot)) return cudaErrorInvalidValue;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(shard_lines, kLL128LinesPerBlock),
                                                           kLL128MaxBlocks));
  return visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return visit_world(world, [&](auto w) {
      return launch_kernel(all_reduce_two_shot_ll128_kernel<T, decltype(w)::value>, blocks, kTwoShotLL128Threads, 0,
                           stream, p.dependent_launch, p);
    });
  });
}

int64_t all_reduce_one_shot_ll128_max_numel(DType dtype) {
  return 2 * int64_t(kTwoShotLL128LinesPerSlot) * int64_t(kLL128PayloadBytes) / dtype_size(dtype);
}

cudaError_t launch_all_reduce_one_shot_ll128(const AllReduceParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const int64_t words = ceil_div<int64_t>(p.numel * dtype_size(p.dtype), 8);
  const int64_t lines = ceil_div<int64_t>(words, kLL128LineWords);
  if (lines > 2 * int64_t(kTwoShotLL128LinesPerSlot)) return cudaErrorInvalidValue;
  const int64_t slot_lines = std::min<int64_t>(lines, kTwoShotLL128LinesPerSlot);
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(slot_lines, kLL128LinesPerBlock),
                                                           kLL128MaxBlocks));
  return visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return visit_world(p.comm.world, [&](auto w) {
      return launch_kernel(all_reduce_one_shot_ll128_kernel<T, decltype(w)::value>, blocks, kTwoShotLL128Threads, 0,
                           stream, p.dependent_launch, p);
    });
  });
}

cudaError_t launch_all_reduce_two_shot(const AllReduceParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const int esize = dtype_size(p.dtype);
  const int vec = 16 / esize;
  const int world = p.comm.world;
  const int64_t shard = ceil_div<int64_t>(ceil_div<int64_t>(p.numel, world), vec) * vec;
  const int target_blocks = std::clamp(p.blocks > 0 ? p.blocks : 32, 1, kTwoShotMaxBlocks);
  // Spread small tensors over the target number of blocks; large ones use full
  // chunks, as large as asked while the blocks' chunks fit the region.
  const int64_t chunk_bytes = std::clamp<int64_t>(p.chunk_bytes > 0 ? p.chunk_bytes : kTwoShotChunkBytes, 16,
                                                  std::min<int64_t>(kTwoShotMaxChunkBytes,
                                                                    kTwoShotRegionBytes / target_blocks));
  const int64_t max_chunk = chunk_bytes / 16 * 16 / esize;
  const int64_t chunk =
      std::min(max_chunk, ceil_div<int64_t>(ceil_div<int64_t>(shard, target_blocks), vec) * vec);
  const int64_t chunks = ceil_div<int64_t>(shard, chunk);
  const int blocks = static_cast<int>(std::min<int64_t>(chunks, target_blocks));
  return visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return visit_world(world, [&](auto w) {
      return launch_kernel(all_reduce_two_shot_kernel<T, decltype(w)::value>, blocks, kTwoShotThreads, 0, stream,
                    p.dependent_launch, p, chunk);
    });
  });
}

}  // namespace distfuse
