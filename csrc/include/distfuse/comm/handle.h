// Plain device handle of a symmetric workspace: passed by value to kernels.
//
// Every rank of a group allocates one symmetric buffer of identical size and
// layout. `peer_base[p]` is rank p's buffer mapped into this GPU's address space
// (peer_base[rank] is our own). Offsets below are identical on every rank, so a
// kernel addresses "region X of rank p" as peer_base[p] + offset_of_X.
//
//   symmetric buffer (per rank)
//   +----------+---------------+-------------------+-------------------+-----------------+-----------------+-----------------+--------------+
//   | counters | flags         | one-shot LL lines | two-shot LL lines | decode LL lines | LL128 lines     | two-shot chunks | tile region  |
//   | (local)  | (peers write) | (peers write)     | (peers write)     | (peers write)   | (peers write)   | (peers write)   | (GEMM tiles) |
//   +----------+---------------+-------------------+-------------------+-----------------+-----------------+-----------------+--------------+
//   └──────────────────────────── zeroed at creation (epoch 0 never appears) ──────────────────────────┘
//
// Each algorithm ("channel") owns its counters, flags and data region, so two
// algorithms used back to back never touch each other's memory.
#pragma once

#include <cstdint>

namespace distfuse {

constexpr int kMaxWorld = 8;
constexpr int kMaxBlocks = 1024;  // per channel: epoch counters and flag slots

enum Channel : int {
  kChannelOneShot = 0,  // one-shot, 2 lines per thread
  kChannelTwoShot = 1,
  kChannelTiles = 2,
  kChannelTilesReceived = 3,  // tile consumers: partials and sums landed
  kChannelOneShotFine = 4,  // one-shot, 1 line per thread (twice the CTAs)
  kChannelBands = 5,        // band all-reduce of GEMM outputs by the copy engines
  kChannelTwoShotLL = 6,    // two-shot on LL lines (mid sizes)
  kChannelBandPull = 7,     // band all-reduce of GEMM outputs by SM pulls
  kChannelDecodeGemm = 8,   // decode matmul_all_reduce in one kernel
  kChannelTwoShotLL128 = 9,  // two-shot on 128-byte lines (mid sizes, NVLink)
  kNumChannels = 10,
};

struct WorkspaceLayout {
  // Per channel and block: the epoch counter this rank's blocks advance.
  uint64_t counters_offset;
  uint64_t counters_bytes;
  // Per channel: kFlagsPerChannel uint32 slots written by peers.
  uint64_t flags_offset;
  uint64_t flags_bytes;
  // One-shot LL region: [geometry 2][parity 2][src world][kOneShotLinesPerSlot] 16-byte
  // lines, one part per CTA geometry (each has its own channel, so its own epochs).
  uint64_t oneshot_offset;
  uint64_t oneshot_bytes;
  // Two-shot LL region: [phase 2][parity 2][src world][kTwoShotLLLinesPerSlot] lines.
  uint64_t twoshot_ll_offset;
  uint64_t twoshot_ll_bytes;
  // Decode matmul_all_reduce LL region: [src world][kDecodeLLLinesPerSlot] LL lines,
  // then [src world][kDecodeLL128BytesPerSlot] of LL128 lines (apart, so that neither
  // kind of line is ever read where the other was written).
  uint64_t decode_ll_offset;
  uint64_t decode_ll_bytes;
  // Two-shot LL128 region: [phase 2][parity 2][src world][kTwoShotLL128LinesPerSlot]
  // 128-byte lines.
  uint64_t twoshot_ll128_offset;
  uint64_t twoshot_ll128_bytes;
  // Two-shot region: [phase 2][slot 2][src world][kTwoShotRegionBytes], in which
  // block b of a launch using chunks of c bytes owns [b * c, (b + 1) * c).
  uint64_t twoshot_offset;
  uint64_t twoshot_bytes;
  // Tile region for fused GEMM ops (size chosen by init_workspace(max_bytes)).
  uint64_t tiles_offset;
  uint64_t tiles_bytes;
  uint64_t total_bytes;
};

constexpr uint64_t kFlagsPerChannel = 2ull * kMaxBlocks * kMaxWorld * 4;  // 65536 slots
constexpr int kMaxTiles = 32768;  // output tiles of one fused GEMM call (flags per tile)

// One-shot: payload capacity of one call; a line carries 8 payload bytes.
constexpr uint64_t kOneShotCapacityBytes = 1ull << 20;
constexpr uint64_t kOneShotLinesPerSlot = kOneShotCapacityBytes / 8;
// Two-shot on LL lines: lines of one shard (the shard's payload / 8), so a call
// carries at most world x kTwoShotLLShardBytes.
constexpr uint64_t kTwoShotLLShardBytes = 1ull << 20;
constexpr uint64_t kTwoShotLLLinesPerSlot = kTwoShotLLShardBytes / 8;
// Decode matmul_all_reduce on LL lines: payload capacity of one call per source.
constexpr uint64_t kDecodeLLCapacityBytes = 256ull << 10;
constexpr uint64_t kDecodeLLLinesPerSlot = kDecodeLLCapacityBytes / 8;
constexpr uint64_t kDecodeLL128BytesPerSlot = 512ull << 10;
// Two-shot on 128-byte lines (120 payload bytes and an 8-byte flag each): lines of
// one shard, so a call carries at most world x 120 x kTwoShotLL128LinesPerSlot bytes
// (a little over 2 MB per rank).
constexpr uint64_t kLL128LineBytes = 128;
constexpr uint64_t kLL128PayloadBytes = 120;
constexpr int kLL128LineWords = int(kLL128PayloadBytes / 8);  // 8-byte payload words per line
constexpr uint64_t kTwoShotLL128LinesPerSlot = 17920;
// Most bytes one LL128 two-shot call of a `world`-rank group carries.
constexpr uint64_t two_shot_ll128_capacity_bytes(int world) {
  return uint64_t(world) * kLL128PayloadBytes * kTwoShotLL128LinesPerSlot;
}
// Grid of every LL128 launch at most: block b handles line chunks b, b + kLL128MaxBlocks,
// ... (32 lines each), a map that does not depend on the call's size. The blocks must be
// resident together (no block may wait for a peer block that has no SM), so LL128 lines
// are allowed only on GPUs with kLL128MaxBlocks / kLL128BlocksPerSm SMs or more
// (comm/workspace.cpp). 2 x H200, W = 2, graph: 384 blocks instead of 256 take 1 MB from
// 7.2 to 6.6 us (one-shot), 2 MB from 10.8 to 10.2 (one-shot) and 11.9 to 10.4
// (two-shot), 4 MB from 18.4 to 17.2 (two-shot); the two-shot at 3 MB from 13.9 to 14.8.
constexpr int kLL128MaxBlocks = 384;
constexpr int kLL128BlocksPerSm = 3;
// Whether a GPU with `sms` SMs holds a whole LL128 grid at once.
constexpr bool ll128_grid_fits(int sms) { return sms * kLL128BlocksPerSm >= kLL128MaxBlocks; }
// Two-shot: per (phase, slot, source) region, split among the blocks of a launch
// (blocks x chunk bytes <= kTwoShotRegionBytes); default and largest chunk.
constexpr uint64_t kTwoShotRegionBytes = 8ull << 20;
constexpr uint64_t kTwoShotChunkBytes = 32ull << 10;
constexpr uint64_t kTwoShotMaxChunkBytes = 256ull << 10;
constexpr int kTwoShotMaxBlocks = 128;
constexpr int kTwoShotSlots = 2;  // steps of one block are double-buffered

inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// Tile region a fused GEMM op needs for an output of `output_bytes` (M·N·element
// size): the partial product plus two parities of one receive slot per rank.
inline uint64_t tile_region_bytes_for_output(uint64_t output_bytes, int world) {
  return (1 + 2ull * world) * output_bytes;
}

// The layout every rank of a `world`-sized group uses.
inline WorkspaceLayout make_layout(int world, uint64_t tile_bytes) {
  constexpr uint64_t kAlign = 4096;
  WorkspaceLayout l{};
  l.counters_offset = 0;
  l.counters_bytes = align_up((uint64_t(kNumChannels) * kMaxBlocks + kMaxTiles) * 4, kAlign);
  l.flags_offset = l.counters_offset + l.counters_bytes;
  l.flags_bytes = align_up(uint64_t(kNumChannels) * kFlagsPerChannel * 4, kAlign);
  l.oneshot_offset = l.flags_offset + l.flags_bytes;
  l.oneshot_bytes = 2ull * 2ull * world * kOneShotLinesPerSlot * 16;
  l.twoshot_ll_offset = align_up(l.oneshot_offset + l.oneshot_bytes, kAlign);
  l.twoshot_ll_bytes = 2ull * 2ull * world * kTwoShotLLLinesPerSlot * 16;
  l.decode_ll_offset = align_up(l.twoshot_ll_offset + l.twoshot_ll_bytes, kAlign);
  l.decode_ll_bytes = uint64_t(world) * (kDecodeLLLinesPerSlot * 16 + kDecodeLL128BytesPerSlot);
  l.twoshot_ll128_offset = align_up(l.decode_ll_offset + l.decode_ll_bytes, kAlign);
  l.twoshot_ll128_bytes = 2ull * 2ull * world * kTwoShotLL128LinesPerSlot * kLL128LineBytes;
  l.twoshot_offset = align_up(l.twoshot_ll128_offset + l.twoshot_ll128_bytes, kAlign);
  l.twoshot_bytes = 2ull * kTwoShotSlots * world * kTwoShotRegionBytes;
  l.tiles_offset = align_up(l.twoshot_offset + l.twoshot_bytes, kAlign);
  l.tiles_bytes = align_up(tile_bytes, kAlign);
  l.total_bytes = l.tiles_offset + l.tiles_bytes;
  return l;
}

struct CommHandle {
  unsigned char* peer_base[kMaxWorld];
  int rank;
  int world;
  uint64_t timeout_ns;  // bound on every spin-wait; 0 means the default (see signal.cuh)
  WorkspaceLayout layout;

#if defined(__CUDACC__)
  __host__ __device__
#endif
  inline uint32_t* counters(int channel) const {
    return reinterpret_cast<uint32_t*>(peer_base[rank] + layout.counters_offset) +
           channel * kMaxBlocks;
  }
#if defined(__CUDACC__)
  __host__ __device__
#endif
  inline uint32_t* flags(int peer, int channel) const {
    return reinterpret_cast<uint32_t*>(peer_base[peer] + layout.flags_offset) +
           channel * kFlagsPerChannel;
  }
  // Per-tile counters of calls this rank has consumed (local only).
#if defined(__CUDACC__)
  __host__ __device__
#endif
  inline uint32_t* tile_seen() const {
    return reinterpret_cast<uint32_t*>(peer_base[rank] + layout.counters_offset) +
           kNumChannels * kMaxBlocks;
  }
};

}  // namespace distfuse
