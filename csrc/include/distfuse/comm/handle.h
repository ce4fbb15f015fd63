// Plain device handle of a symmetric workspace: passed by value to kernels.
//
// Every rank of a group allocates one symmetric buffer of identical size and
// layout. `peer_base[p]` is rank p's buffer mapped into this GPU's address space
// (peer_base[rank] is our own). Offsets below are identical on every rank, so a
// kernel addresses "region X of rank p" as peer_base[p] + offset_of_X.
//
//   symmetric buffer (per rank)
//   +-----------+---------------+-------------------+--------------------+-----------------+
//   | counters  | flags         | one-shot LL lines | two-shot chunks    | tile region     |
//   | (local)   | (peers write) | (peers write)     | (peers write)      | (GEMM tiles)    |
//   +-----------+---------------+-------------------+--------------------+-----------------+
//
// Each algorithm ("channel") owns its counters, flags and data region, so two
// algorithms used back to back never touch each other's memory.
#pragma once

#include <cstdint>

namespace distfuse {

constexpr int kMaxWorld = 8;
constexpr int kMaxBlocks = 1024;  // per channel: epoch counters and flag slots

enum Channel : int {
  kChannelOneShot = 0,
  kChannelTwoShot = 1,
  kChannelTiles = 2,
  kChannelDecode = 3,
  kNumChannels = 4,
};

struct WorkspaceLayout {
  // Per channel and block: the epoch counter this rank's blocks advance.
  uint64_t counters_offset;
  uint64_t counters_bytes;
  // Per channel: kFlagsPerChannel uint32 slots written by peers.
  uint64_t flags_offset;
  uint64_t flags_bytes;
  // One-shot LL region: [parity 2][src world][kMaxBlocks * lines_per_block] 16-byte lines.
  uint64_t oneshot_offset;
  uint64_t oneshot_bytes;
  // Two-shot region: [phase 2][parity 2][src world][blocks][chunk_bytes].
  uint64_t twoshot_offset;
  uint64_t twoshot_bytes;
  // Tile region for fused GEMM ops (size chosen by init_workspace(max_bytes)).
  uint64_t tiles_offset;
  uint64_t tiles_bytes;
  uint64_t total_bytes;
};

constexpr uint64_t kFlagsPerChannel = 2ull * kMaxBlocks * kMaxWorld * 4;  // generous, 256 KB

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
};

}  // namespace distfuse
