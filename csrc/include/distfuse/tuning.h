// Dispatch decisions of the fused ops: pure functions of shapes, dtype and group
// size, so every rank takes the same decision. Entries for W > 4 are untuned
// extrapolations until measured on 8-GPU machines.
#pragma once

#include <cstdint>

namespace distfuse {

enum class AllReduceAlgo : int { kOneShot = 0, kTwoShot = 1 };

// Largest all-reduce (bytes per rank) taken by the one-shot algorithm.
inline int64_t one_shot_threshold_bytes(int world) {
  if (world <= 2) return 1 << 20;
  if (world <= 4) return 256 << 10;
  return 128 << 10;  // untuned (W > 4)
}

// `override_threshold` > 0 replaces the table (benchmarks sweep it).
inline AllReduceAlgo choose_all_reduce(int64_t bytes, int world, int64_t one_shot_capacity_bytes,
                                       int64_t override_threshold = 0) {
  int64_t threshold = override_threshold > 0 ? override_threshold : one_shot_threshold_bytes(world);
  if (threshold > one_shot_capacity_bytes) threshold = one_shot_capacity_bytes;
  return bytes <= threshold ? AllReduceAlgo::kOneShot : AllReduceAlgo::kTwoShot;
}

// Blocks of the two-shot kernel (each moves 32 KB chunks; more blocks keep more
// NVLink transfers in flight: 32 -> 64 blocks took 256 MB from 1401 to 1001 us on
// 2 x H200). At most one wave on a 132-SM GPU. Measured at W = 2 only; W > 2 untuned.
inline int two_shot_blocks(int world, int override_blocks = 0) {
  if (override_blocks > 0) return override_blocks;
  (void)world;
  return 128;
}

// Bytes a two-shot block moves per peer and step (one flag round trip each).
// Untuned (32 KB measured at W = 2 only).
inline int64_t two_shot_chunk_bytes(int world, int64_t override_bytes = 0) {
  if (override_bytes > 0) return override_bytes;
  (void)world;
  return 32 << 10;
}

}  // namespace distfuse

namespace distfuse {

enum class MatmulAllReduceAlgo : int { kSequential = 0, kFusedTiles = 1, kDecodePush = 2 };

// Largest M (rows of the GEMM) that takes the decode push path. Untuned (no
// overlapped run measured yet), for every W.
inline int64_t decode_max_m(int world) {
  (void)world;
  return 128;
}

// Which schedule runs matmul_all_reduce when the fused GEMM can run at all.
inline MatmulAllReduceAlgo choose_matmul_all_reduce(int64_t m, int world,
                                                    int64_t override_decode_max_m = 0) {
  const int64_t limit = override_decode_max_m > 0 ? override_decode_max_m : decode_max_m(world);
  return m <= limit ? MatmulAllReduceAlgo::kDecodePush : MatmulAllReduceAlgo::kFusedTiles;
}

// Consumer CTAs that run beside the GEMM (the GEMM keeps the other SMs). Untuned,
// for every W.
inline int consumer_blocks(MatmulAllReduceAlgo algo, int world, int override_blocks = 0) {
  if (override_blocks > 0) return override_blocks;
  (void)world;
  return algo == MatmulAllReduceAlgo::kDecodePush ? 8 : 24;
}

// Owner mode: tiles a consumer CTA pushes between two rounds of flag releases
// (each round waits until the CTA's pushes landed). Untuned.
inline int owner_group_tiles(int world, int override_tiles = 0) {
  if (override_tiles > 0) return override_tiles;
  (void)world;
  return 4;
}

}  // namespace distfuse
