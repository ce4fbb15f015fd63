// Dispatch decisions of the fused ops: pure functions of shapes, dtype and group
// size, so every rank takes the same decision. Entries for W > 4 are untuned
// extrapolations until measured on 8-GPU machines.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "distfuse/comm/handle.h"

namespace distfuse {

// The measured layers split at K_r = 7168: o_proj (K_r = 2048 / 4096 at W = 4 / 2) below
// it, down_proj (7168 / 14336) from it, where the GEMM is long beside its all-reduce.
// The rules measured to differ between the two layers split there.
constexpr int64_t kLongGemmMinK = 7168;

enum class AllReduceAlgo : int { kOneShot = 0, kTwoShot = 1, kTwoShotLL = 2, kTwoShotLL128 = 3, kOneShotLL128 = 4 };

// Largest all-reduce (bytes per rank) taken by the one-shot algorithm.
inline int64_t one_shot_threshold_bytes(int world) {
  if (world <= 2) return 1 << 20;
  if (world <= 4) return 256 << 10;
  return 128 << 10;  // untuned (W > 4)
}

// Largest all-reduce taken by the LL two-shot (above the one-shot's range); 0: none.
// 4 x H100, W = 4, graph: 512 KB 12.1 us (two-shot 14.2, torch's two-shot 12.1); 1 MB
// 16.7 (two-shot 15.2): twice the bytes cost more than the fences it saves. W = 2:
// the one-shot covers up to 1 MB. W > 4: untuned, same as W = 4.
inline int64_t two_shot_ll_max_bytes(int world, int64_t override_bytes = 0) {
  if (override_bytes > 0) return override_bytes;
  return world >= 3 ? int64_t(512) << 10 : 0;
}

// The LL128 two-shot takes (two_shot_ll128_min_bytes, two_shot_ll128_max_bytes] where
// the group allows LL128 lines (after the LL128 one-shot's range, before the one-shot's
// and the LL two-shot's).
// 2 x H100, W = 2, graph: 1 MB 6.7 us (one-shot 9.1, two-shot 11.4, torch's two-shot
// 12.4), 256 KB 5.0 (one-shot 4.7), 4 KB 4.3 (one-shot 3.3). W >= 3 (prediction): the
// LL two-shot's fixed cost plus 1.07x the two-shot's bytes, ~12 us at 1 MB against
// 14.4-14.5 for the two-shot. W = 4 at 4 MB (LL128 two-shot / two-shot, us): 4 x H100
// with 384-block LL128 grids 25.0 / 29.1 graph, 29.8 / 35.0 eager; 4 x H200 with 256
// 27.3 / 27.9, 32.6 / 33.3: up to 4 MB at W <= 4. At W = 4 beyond that, up to what its
// region holds (8.6 MB; 4 x H200, graph, LL128 two-shot / two-shot: 6 MB 36.5 / 37.7 us,
// 8 MB 44.8 / 46.3; cuBLAS + the all-reduce at M = 512, o_proj 69.6 / 71.4, down_proj
// 122.3 / 125.0): the whole region. W = 3: 4 MB (untuned above). W > 4: untuned, 2 MB.
// `override_bytes` > 0 replaces the table.
inline int64_t two_shot_ll128_min_bytes(int world) {
  const int64_t one_shot = one_shot_threshold_bytes(world);
  return one_shot < (int64_t(256) << 10) ? one_shot : int64_t(256) << 10;
}
inline int64_t two_shot_ll128_max_bytes(int world, int64_t override_bytes = 0) {
  if (override_bytes > 0) return override_bytes;
  if (world == 4) return int64_t(two_shot_ll128_capacity_bytes(world));
  return world < 4 ? int64_t(4) << 20 : int64_t(2) << 20;
}

// The LL128 one-shot takes (one_shot_ll128_min_bytes, one_shot_ll128_max_bytes] where
// the group allows LL128 lines, before every other range. At W = 2 it carries the
// LL128 two-shot's bytes with one hop fewer; at W > 2 (W - 1) / 2 times its bytes.
// 4 x H200, graph, us (LL one-shot / LL128 two-shot / LL128 one-shot): W = 4 16 KB
// 4.8 / 6.3 / 4.3, 128 KB 6.8 / 6.7 / 5.3, 256 KB 9.1 / 7.0 / 6.6, 384 KB 11.2 / 7.3 /
// 7.7; W = 2 64 KB 3.6 / 4.5 / 3.7, 256 KB 4.7 / 4.9 / 4.3. W = 2 with 384-block LL128
// grids (2 x H200, graph, us; LL128 two-shot / LL128 one-shot): 1 MB 7.2 / 6.6, 2 MB
// 10.4 / 10.2, 3 MB 14.8 / 14.2, 4 MB 17.3 / 17.8: at W = 2 one range up to 3 MB.
// W > 4: untuned, off. `override_bytes` > 0 replaces the table.
inline int64_t one_shot_ll128_min_bytes(int world) { return world <= 2 ? int64_t(64) << 10 : 0; }
inline int64_t one_shot_ll128_max_bytes(int world, int64_t override_bytes = 0) {
  if (override_bytes > 0) return override_bytes;
  if (world <= 2) return int64_t(3) << 20;
  return world <= 4 ? int64_t(256) << 10 : 0;
}

// `override_threshold` / `override_ll_max` / `override_ll128_max` /
// `override_one_shot_ll128_max` > 0 replace the table (benchmarks sweep them);
// capacities are what the workspace regions hold (0 for the LL128 paths where the
// group does not allow their lines).
inline AllReduceAlgo choose_all_reduce(int64_t bytes, int world, int64_t one_shot_capacity_bytes,
                                       int64_t override_threshold = 0, int64_t two_shot_ll_capacity_bytes = 0,
                                       int64_t override_ll_max = 0, int64_t two_shot_ll128_capacity_bytes = 0,
                                       int64_t override_ll128_max = 0, int64_t one_shot_ll128_capacity_bytes = 0,
                                       int64_t override_one_shot_ll128_max = 0) {
  const int64_t one_shot_ll128_max = std::min(one_shot_ll128_max_bytes(world, override_one_shot_ll128_max),
                                              one_shot_ll128_capacity_bytes);
  if (bytes > one_shot_ll128_min_bytes(world) && bytes <= one_shot_ll128_max) return AllReduceAlgo::kOneShotLL128;
  int64_t ll128_max = two_shot_ll128_max_bytes(world, override_ll128_max);
  if (ll128_max > two_shot_ll128_capacity_bytes) ll128_max = two_shot_ll128_capacity_bytes;
  if (bytes > two_shot_ll128_min_bytes(world) && bytes <= ll128_max) return AllReduceAlgo::kTwoShotLL128;
  int64_t threshold = override_threshold > 0 ? override_threshold : one_shot_threshold_bytes(world);
  if (threshold > one_shot_capacity_bytes) threshold = one_shot_capacity_bytes;
  if (bytes <= threshold) return AllReduceAlgo::kOneShot;
  int64_t ll_max = two_shot_ll_max_bytes(world, override_ll_max);
  if (ll_max > two_shot_ll_capacity_bytes) ll_max = two_shot_ll_capacity_bytes;
  return bytes <= ll_max ? AllReduceAlgo::kTwoShotLL : AllReduceAlgo::kTwoShot;
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
// 4 x H100, W = 2, 128 blocks: 64 KB takes 256 MB from 834 to 756 us and 64 MB from
// 222 to 205 (fewer flag round trips per byte); W = 4 (4 x H200): no gain, 32 KB.
// W > 4: untuned.
inline int64_t two_shot_chunk_bytes(int world, int64_t override_bytes = 0) {
  if (override_bytes > 0) return override_bytes;
  return world <= 2 ? 64 << 10 : 32 << 10;
}

// One-shot CTA geometry: LL lines (8 payload bytes each) per thread; 1 puts twice
// the CTAs (SMs) on every size. 4 x H100: 1 is faster at every size (W = 4: 64 KB
// 6.3 -> 5.7 us, 256 KB 10.0 -> 9.1; W = 2: 256 KB 5.0 -> 4.7, 1 MB 9.5 -> 9.1, with
// PDL). Override: 1 or 2.
inline int one_shot_lines_per_thread(int world, int override_value = 0) {
  (void)world;
  return override_value == 2 ? 2 : 1;
}

// Launch the all-reduce kernels as programmatic dependents of the previous kernel
// (PDL: the launch overlaps that kernel's tail). 4 x H100: 0.2-0.9 us off every
// graph-captured size at W = 2 and 4. Override: 1 on, 2 off.
inline bool dependent_launch(int world, int64_t override_value = 0) {
  (void)world;
  return override_value != 2;
}

}  // namespace distfuse

namespace distfuse {

enum class MatmulAllReduceAlgo : int {
  kSequential = 0, kFusedTiles = 1, kDecodePush = 2, kCopyEngine = 3, kBandPull = 4, kPairExchange = 5,
  kOwnerExchange = 6, kBandScatter = 7, kDecodeSplitK = 8
};
// GPUs as far as the dispatch table tells them apart (from the name all members of
// the group share; "mixed" and unknown names are kOther).
enum class GpuClass : int { kH100 = 0, kOther = 1, kH200 = 2 };
inline GpuClass gpu_class(const std::string& name) {
  if (name.find("H100") != std::string::npos) return GpuClass::kH100;
  return name.find("H200") != std::string::npos ? GpuClass::kH200 : GpuClass::kOther;
}

// Measured on 4 x H200 at W = 2 and 4 (Llama-3-70B o_proj and down_proj rows,
// benchmarks/NOTES.md): for M <= 512 both overlapped schedules are slower than
// cuBLAS + the distfuse all-reduce (the tile GEMM alone takes 16.5 us at M = 1
// where cuBLAS takes 7.7 us); at M = 2048 the owner schedule ties or loses; at
// M = 8192 it wins when K_r <= 8192, and loses for down_proj at W = 2
// (K_r = 14336: the GEMM is 5.8x the all-reduce, and the SMs the consumers take
// cost more than the overlap hides). W > 4: untuned, same rule.
inline int64_t fused_min_m(int world) {
  (void)world;
  return 4096;
}
inline int64_t fused_max_k(int world) {
  (void)world;
  return 8192;
}

// The SM-pull band schedule (one persistent kernel, v13) from M = 4096 with K_r >= 2048,
// and where the all-reduce dominates (W >= 4, K_r < 4096), since its last bands go to the
// two-shot all-reduce (band_tail_two_shot, v21), from M = 2048 on H200 and 4096 elsewhere:
// W = 4 o_proj M = 2048 / 4096 242.3 / 416.9 us vs sequential 255.0 / 495.1 and fused_tiles
// 259.6 / 437.7 (4 x H200, forced columns, same run); 4 x H100 run of record: 264.5 / 432.4
// vs sequential 260.8 / 495.5 and fused_tiles 265.1 / 446.4 (M = 2048 loses there).
// Before that tail (v13), forced
// sweeps (benchmarks/NOTES.md, v13), same runs: W = 4 o_proj (K_r = 2048) M = 8192 /
// 16384 781 / 1472 us vs fused_tiles 819 / 1558 (4 x H100), 770 / 1456 vs 795 / 1541
// (4 x H200), but M = 4096 451 vs 445 (H100), 436 vs 431 (H200); W = 2 o_proj M = 4096
// 473 vs fused_tiles 494 (H100), 442 vs 482 (H200); W = 2 down_proj M = 4096 1368 vs
// sequential 1403 (H100), 1333 vs 1402 (H200). At M = 2048 it loses (W = 4 o_proj
// 278 vs sequential 252, down_proj 589 vs 458); at W = 2 down_proj (K_r >= 14336) with
// the last GEMM wave's bands after the GEMM (band_tail_bands) it beat sequential (684 vs
// 706 us, 4 x H100), but the pair exchange with its last tiles in the consumers beats it
// there (v19, 2 x H200: 680.3 vs 692.4). W > 4: untuned, same rule as W = 4.
// At W = 2 with K_r < 7168 (o_proj) the pair exchange keeps all SMs for the GEMM and
// beats the band schedule below M = 16384 (benchmarks/NOTES.md, v25; forced columns,
// same runs, w.t(), M = 4096 / 8192, µs): 4 x H100 443.6 / 854.4 vs 469.2 / 892.3 and
// 454.9 / 896.0 vs 480.1 / 917.9; 4 x H200 433.7 / 843.1 vs 442.8 / 849.6 and - / 864.5
// vs - / 874.2. At M = 16384 the two are within 1 % either way (band vs pair: H100 1700.5
// vs 1701.6, 1767.8 vs 1790.8, 1714.2 vs 1698.5; H200 1671.4 vs 1680.6): the band schedule
// stays there. Measured at K_r = 4096 only.
// On H100 at W >= 4 with K_r >= 7168 (down_proj) from M = 2048 since its GEMM takes whole
// tiles (band_gemm_whole_tiles) and the band CTAs the GEMM's fifth wave leaves free
// (band_reduce_blocks_for_waves): 4 x H100, forced columns, same runs (NOTES.md, v33):
// 460.2 / 460.6 us at 16 CTAs and 453.7 at 29 against sequential 466.9 / 464.4 (570.4 with
// stream-K). On H200 too since then: 4 x H200, W = 4 down_proj M = 2048, forced columns,
// four runs of record and sweeps of this GEMM (NOTES.md, "Dispatch at the measured
// rows"): band_pull 443.5 / 444.7 / 445.0 / 441.7 us against the owner exchange 448.9 /
// 448.7 / 459.0 / 449.9 and sequential 464.0 / 470.8 / 478.1 / 479.4.
inline int64_t band_pull_min_m(int world, int64_t k, GpuClass gpu = GpuClass::kH200) {
  if (world >= 4 && k >= kLongGemmMinK && (gpu == GpuClass::kH100 || gpu == GpuClass::kH200)) return 2048;
  if (world == 2 && k < kLongGemmMinK) return 16384;
  return world >= 4 && k < 4096 && gpu == GpuClass::kH200 ? 2048 : 4096;
}
inline int64_t band_pull_min_k(int world) {
  (void)world;
  return 2048;
}

// The pair exchange (two ranks: the tile GEMM's idle producer warps exchange every
// finished tile with the peer, no SM taken from the GEMM) from M = 512 where the band
// schedule does not run (o_proj below M = 16384, down_proj below 4096). Forced columns,
// same runs (benchmarks/NOTES.md, v17), W = 2: o_proj M = 1024 / 2048 / 4096 144.2 /
// 247.4 / 448.3 us vs sequential 151.9 / 286.5 / 544.5 and band_pull 202.3 / 313.2 /
// 438.9 (2 x H200); M = 2048 / 8192 261.5 / 920.3 vs sequential 290.5 / 1109.1, band_pull
// 351.0 / 896.5 (2 x H100). With each CTA's last
// tile exchanged by its consumers (v19, 2 x H200): o_proj M = 512 74.6 us (128 x 128
// tiles) vs sequential 77.1, M = 1024 / 2048 140.4 / 245.8 vs 152.3 / 288.0; down_proj
// M = 512 191.3 vs 195.5, M = 2048 680.3 vs band_pull 692.4 and sequential 716.7 (band_pull
// from M = 4096: 1309.0 vs 1345.9). M = 128 (one wave of 64 x 128 tiles): 34.3 vs 33.0,
// so not below 512 (M = 129-511 unmeasured). H100 (4 x H100 run of record, build of v19):
// M = 512 loses (down_proj 206.1 vs sequential 195.3, o_proj 80.2 vs 80.8), M = 2048 wins
// (o_proj 251.1 vs 292.2, down_proj 696.0 vs band_pull 710.4): from 1024 there (M = 1024
// from the H200 rows) until the rows below.
// Since the dependent timeout check (v38b) the H100 o_proj rows moved: 4 x H100, W = 2,
// forced columns, pair_exchange vs sequential, µs: o_proj M = 512 78.8 / 80.3 and 79.1 /
// 80.5 (run of record of 2026-11-27 23:17, w.t() and row), 78.3 / 79.5 and 78.6 / 79.8
// (2026-11-28), M = 768 113.2 / 117.7 and 114.2 / 118.1; down_proj still loses there (M =
// 512 201.0 vs 190.4, M = 768 297.0 vs 278.4) and wins from 1024 (342.8 vs 355.8). So on
// H100 from M = 512 where K_r < 7168, from 1024 above (measured at K_r = 4096 and 14336).
inline int64_t pair_exchange_min_m(int world, int64_t k, GpuClass gpu = GpuClass::kH200) {
  if (world != 2) return INT64_MAX;
  return gpu == GpuClass::kH100 && k >= kLongGemmMinK ? 1024 : 512;
}

// The owner exchange (any group size: the tile GEMM's idle producer warps push every
// finished tile to its owner rank, which sums and is pulled from) at W >= 3 where the
// GEMM dominates (K_r >= 7168: down_proj) from M = 2048, below the band schedule's range.
// 4 x H200, W = 4, forced columns, three runs of this build (benchmarks/NOTES.md, v19):
// down_proj M = 2048 448.4 / 450.1 / 449.8 us against sequential 464.6 / 478.7 / 477.0,
// band_pull 493.6 / 496.4 / 497.5; it loses at M = 512 (149 against 125) and wherever the
// all-reduce dominates (o_proj M = 2048 345 against 254, M = 8192 1215 against band_pull
// 770), and to the band schedule from M = 4096 (down_proj M = 8192 1593-1601 against
// 1434-1442). At W = 2 the pair exchange is faster (o_proj M = 2048 245.8 against 303.2).
// M = 1024-2047 unmeasured. H100 (4 x H100, W = 4, three runs of the v20 build): down_proj
// M = 2048 466.4 / 465.9 / 464.3 against sequential 464.9 / 459.8 / 462.5, so never there.
// Since the band GEMM takes whole tiles (v33) band_pull beats it at W = 4 on H200 too
// (band_pull_min_m), so it runs at W = 3 only. W > 4: untuned, same rule.
inline int64_t owner_exchange_min_m(int world, int64_t k, GpuClass gpu = GpuClass::kH200) {
  return world >= 3 && k >= kLongGemmMinK && gpu != GpuClass::kH100 ? 2048 : INT64_MAX;
}

// Both tile exchanges: output tile (TileGemmParams::tile_shape: 0 by M, 1 64x128, 2
// 128x128, 3 128x256) and CTAs (0: one per SM; fewer give each CTA more tiles). Sweeps,
// 2 x H200, W = 2, pair exchange (benchmarks/NOTES.md, v18): o_proj M = 128 at 128 / 64 /
// 43 / 32 CTAs 37.1 / 42.8 / 54.0 / 65.6 us (the weights stream at the rate of the SMs
// that read them); 128x128 tiles against 128x256 at o_proj M = 512 / 1024 / 2048 79.4 /
// 147.7 / 277.4 vs 84.9 / 145.9 / 251.0; with the last tiles in the consumers (v19) 74.6 /
// 141.6 / 265.9 vs 80.4 / 140.4 / 245.8, down_proj M = 512 191.3 vs 195.9. So: 128x128
// tiles from M = 512 (two waves of them where 128x256 makes one) below M = 1024, else by
// M. At W = 2 those 128x128 tiles in ping-pong (4: each epilogue under the other warp
// group's MMAs; NOTES.md, "The ping-pong tile GEMM"), 2 x H200, same runs, w.t(): o_proj
// M = 512 72.9 / 72.7 us against 74.5 / 74.6, down_proj M = 512 195.8 against 199.6; at
// M = 2048 / 8192 ping-pong 128x128 tiles lose to 128x256 (256.3 / 979.2 against 241.8 /
// 865.7: twice the tiles for the exchange warps). The owner exchange (W >= 3) keeps the
// cooperative 128x128 tiles: 4 x H200, W = 4, M = 512, same run, 2 / 4: o_proj 101.2 /
// 103.7 us, down_proj 149.0 / 148.4. Unmeasured on H100 (the same SMs; the gain is the
// epilogue under the MMAs).
inline int exchange_tile_shape(int64_t m, int world, int override_value = 0) {
  if (override_value > 0) return override_value;
  if (m >= 512 && m < 1024) return world == 2 ? 4 : 2;
  return 0;
}
// CTAs: as few as take the tiles in as many waves as one per SM would, so that every
// wave is whole and every CTA's last tile ends with the others' (512 tiles on 132 SMs:
// 128 CTAs of 4 tiles, not 116 of 4 and 16 of 3). 4 x H200, W = 2, same run, 128 / 132
// CTAs (benchmarks/NOTES.md, v22): o_proj M = 512 / 2048 75.2 / 243.8 us vs 75.5 / 246.6,
// down_proj 203.1 / 688.6 vs 204.2 / 692.6 (2 x H100: down_proj 205.1 / 679.6 vs 207.3 /
// 684.9). Override: the CTAs (at most one per SM).
inline int exchange_ctas(int64_t tiles, int sms, int override_ctas = 0) {
  if (override_ctas > 0) return override_ctas < sms ? override_ctas : sms;
  if (tiles <= 0 || sms <= 0) return sms > 0 ? sms : 1;
  const int64_t waves = (tiles + sms - 1) / sms;
  return int((tiles + waves - 1) / waves);
}

// Pair exchange: each CTA's consumer warp groups exchange its last tile themselves
// once their last MMA is done (the whole tile in flight at once) instead of leaving it
// to the exchange warps (15 KB of staging a round trip), which then take every other
// tile. 2 x H200, W = 2, same runs, on / off (benchmarks/NOTES.md, v19): o_proj M = 128 /
// 512 / 1024 / 2048 / 4096 / 8192 34.3 / 74.6 / 140.4 / 245.8 / 447.8 / 880.8 us vs 37.8 /
// 77.0 / 144.7 / 249.3 / 453.3 / 887.8; down_proj M = 512 / 2048 191.3 / 680.3 vs 193.8 /
// 685.8. Override: 1 on, 2 off.
inline bool exchange_last_tile_in_consumers(int64_t override_value = 0) { return override_value != 2; }

// The one-kernel decode schedule (skinny GEMM pushing its column blocks) up to
// M = decode_max_m; 0: never (forced only). 4 x H100, graph, against cuBLAS + the distfuse
// all-reduce in the same run (benchmarks/NOTES.md, v12f: 128-deep K stages): W = 4 o_proj
// M = 1 / 8 / 16 / 32 / 128 18.6 / 20.7 / 21.5 / 24.3 / 51.2 us vs 19.1 / 21.6 / 24.1 / 26.6 /
// 36.6; down_proj 46.5 / 48.8 / 49.9 / 51.9 / 106.1 vs 47.3 / 49.8 / 52.4 / 55.3 / 67.0.
// W = 2: level or slower (o_proj M = 1 / 16 29.3 / 32.1 vs 28.9 / 30.8): the push to one
// peer saves less than the GEMM loses (cuBLAS reads the weights at the HBM floor, this
// GEMM ~1.5 us above it). 4 x H200, W = 4, same kind of run: o_proj M = 1 / 8 / 16 / 32
// 15.0 / 16.4 / 18.5 / 22.8 vs 16.1 / 18.1 / 20.7 / 23.2, down_proj 33.7 / 35.4 / 39.5 / 48.9
// vs 35.2 / 37.1 / 39.7 / 43.1 (with 64-deep stages it lost on H200: M = 1 17.7 vs 16.0
// and 43.8 vs 35.6). Since the all-reduce's LL128 two-shot, the unfused order caught up at
// M = 32 on H100 too (4 x H100 run of record, build of v19: o_proj 24.3 vs 23.4, down_proj
// 51.9 vs 51.7; M = 8 still 19.0 vs 21.6): 16 on both. Other GPUs: never (unmeasured).
// W > 4: untuned, same as W = 4. W = 2 on H200: up to M = 8 (LL lines), where four runs
// agree (NOTES.md, "Dispatch at the measured rows"; 4 x H200, forced, graph, µs, decode_push
// vs sequential, w.t()): o_proj M = 1 22.2 / 22.2 / 22.3 / 22.2 vs 22.7 / 22.8 / 22.8 / 22.7,
// M = 8 22.9 / 22.9 / 23.0 / 22.7 vs 23.2 / 23.3 / 23.4 / 23.0; down_proj M = 1 58.2 / 58.3 /
// 59.4 / 58.5 vs 60.2 / 60.3 / 61.6 / 60.3, M = 8 59.2 / 59.2 / 60.5 / 59.6 vs 61.2 / 61.3 /
// 62.8 / 61.4; from M = 32 it loses (30.1 vs 25.3). Since the unfused order's all-reduce
// moved to a side stream, o_proj (K_r = 4096) went to it: 2 x H200, three runs of build
// 2d4cac0 (NOTES.md, "W = 2 decode dispatch on H200"), sequential vs decode_push, µs, w.t()
// / row: M = 1 22.31 / 22.25 vs 22.33 / 22.00, M = 2 22.22 / 21.96 vs 22.52 / 22.28, M = 8
// 22.76 / 22.11 vs 22.97 / 22.71 (the other runs within 0.2); down_proj (K_r = 14336)
// M = 1 / 8 61.30 / 62.46 vs 59.35 / 60.40, M = 16 63.00 vs 67.88. So at W = 2 on H200 up
// to M = 8 where K_r >= 7168 (a weight stream long enough that the push's saved hop
// outweighs its GEMM), else never. W = 2 on H100: never (level or slower).
inline int64_t decode_max_m(int world, int64_t k, GpuClass gpu) {
  if (world < 2) return 0;
  if (world == 2) return gpu == GpuClass::kH200 && k >= kLongGemmMinK ? 8 : 0;
  return gpu == GpuClass::kH100 || gpu == GpuClass::kH200 ? 16 : 0;
}
// ... and from M = decode_min_m. On H100 at W >= 3 the unfused order took M <= 2 back
// once the all-reduce ran its LL128 one-shot (v44): 4 x H100, graph, forced columns,
// sequential vs decode_push, two runs of this build (NOTES.md, "H100 runs of record of
// this build"; 2026-11-28), µs: o_proj M = 1 18.2 / 18.6 and 18.3 / 18.7 (w.t()), 18.2 /
// 18.7 (row); M = 2 18.5 / 18.8, row 18.4 / 18.9; M = 4 18.9 / 18.9 (both layouts); M = 8
// 19.7 / 19.0; M = 16 21.1 / 20.1; down_proj M = 1 46.6 / 47.1 and 46.4 / 47.0, M = 2
// 46.6 / 47.2, M = 4 47.0 / 47.1, M = 8 47.8 / 47.3, M = 16 49.3 / 48.4. So from M = 4
// there (M = 3 unmeasured). On H200 decode_push still wins at M = 1 (W = 4 o_proj 14.9
// vs 15.3, down_proj 34.2 vs 34.9, run of record of build f90d613): from 1.
inline int64_t decode_min_m(int world, GpuClass gpu) {
  return world >= 3 && gpu == GpuClass::kH100 ? 4 : 1;
}

// The split-K decode schedule (kernels/gemm/decode_split_k.h: clusters split K, each
// column block's rows pushed while the next one is computed) from M = decode_max_m + 1 up
// to decode_split_k_max_m, where it takes the shape; 0: never (forced only). 2 x H200,
// W = 2, graph, same run (NOTES.md, v46), split-K vs cuBLAS + the distfuse all-reduce:
// o_proj M = 1 / 32 / 128 31.3 / 35.6 / 109.2 us vs 21.8 / 24.7 / 31.2; down_proj M = 1 / 32
// 96.7 / 121.4 vs 61.8 / 66.5: never.
inline int64_t decode_split_k_max_m(int world, GpuClass gpu) {
  (void)world;
  (void)gpu;
  return 0;
}

// Decode schedule: push on LL lines (data and flag in one 16-byte store: no fence,
// one hop less, twice the bytes), when the output fits the LL region: at M = 1 for
// W >= 3, M <= 8 for W = 2. 4 x H100 (v12d), LL vs flags: W = 4 o_proj M = 1 / 8 / 16
// 18.7 / 21.2 / 24.2 us vs 20.6 / 20.9 / 22.6, down_proj M = 1 47.7 vs 49.5; W = 2
// o_proj M = 1 / 8 / 16 29.9 / 30.6 / 31.8 vs 32.0 / 32.3 / 33.5. Override: 1 on, 2 off.
inline bool decode_ll(int world, int64_t m, int64_t output_bytes, uint64_t capacity_bytes,
                      int64_t override_value = 0) {
  if (override_value == 2 || uint64_t(output_bytes) > capacity_bytes) return false;
  return override_value == 1 || m <= (world >= 3 ? 1 : 8);
}

// Decode schedule: push on LL128 lines (15 words and a flag per 128-byte warp store: no
// fence, 1.07x the bytes) where the group allows them and every unit's lines fit the LL
// region (`allowed_and_fits`), at W >= 3 up to M = 16; otherwise decode_ll decides.
// 2 x H100, W = 2, forced decode_push, graph, LL / flags / LL128 (µs): o_proj M = 1 / 8
// / 16 29.3 / 31.3 / 29.2, 29.9 / 31.6 / 29.6, 30.6 / 32.0 / 30.1; down_proj M = 1 / 8 / 16
// 84.3 / 86.5 / 84.5, 85.1 / 86.8 / 85.0, 87.0 / 88.4 / 86.8. 4 x H200, W = 4, o_proj M = 1
// / 8 / 16: 15.4 / 15.8 / 14.9, 17.6 / 16.6 / 15.5, 20.8 / 18.6 / 17.8 (the LL lines lose to
// flags from M = 8 there, LL128 wins throughout). Override (the decode_ll key): 3 LL128,
// 1 or 2 not.
inline bool decode_ll128(int world, int64_t m, bool allowed_and_fits, int64_t override_value = 0) {
  if (!allowed_and_fits || override_value == 1 || override_value == 2) return false;
  return override_value == 3 || (world >= 3 && m <= 16);
}

// Decode schedule: CTAs (at most the SMs; 0: one per SM). Fewer CTAs than column
// blocks give each CTA several, whose pushes overlap its next GEMM block; 4 x H100,
// W = 4 o_proj M = 1: 66 CTAs 33.9 us against 20.4 at one per SM (the weights stream
// at the rate of the SMs that read them).
inline int decode_ctas(int override_ctas = 0) { return override_ctas > 0 ? override_ctas : 0; }

// The owner-scatter band schedule (the GEMM's epilogue stores every tile into its owner
// rank's workspace; the band kernel sums local copies and gathers): never (forced only).
// 4 x H100, forced columns, same runs (benchmarks/NOTES.md, v20): slower than band_pull
// at every measured row, W = 4 o_proj M = 8192 874.9 vs 793.6 us, down_proj M = 8192
// 1630.2 vs 1465.7, W = 2 o_proj M = 8192 1012.1 vs 919.7: the GEMM's TMA stores to a
// peer slow the GEMM by more than the band kernel saves (645 vs 447 us beside it). With
// the stores by the exchange warps (v43) still 3-9 % behind band_pull on 4 x H200.
inline int64_t band_scatter_min_m(int world, int64_t k) {
  (void)world;
  (void)k;
  return INT64_MAX;
}

// Who makes the owner scatter's stores to the peers: the GEMM's exchange warps, by
// load/store units, after the epilogue stored the tile locally (1), or the epilogue's TMA
// stores themselves (2: the stores to a peer hold the TMA unit). 4 x H200, W = 4, same run
// (NOTES.md, v43), 1 / 2: o_proj M = 8192 812.0 / 875.6 us at 16 band CTAs, 787.3 / 914.4
// at 32; down_proj M = 8192 1513.2 / 1593.0 at 8; band_pull 766.1 and 1388.3 beside them.
inline bool band_scatter_by_exchange_warps(int64_t override_value = 0) { return override_value != 2; }
// Overrides of the schedule table below (the tuning keys matmul_all_reduce.<field>):
// each value > 0 replaces the table's entry.
struct MatmulAllReduceOverrides {
  int64_t fused_min_m = 0;
  int64_t band_pull_min_m = 0;
  int64_t band_pull_min_k = 0;  // also bounds the owner scatter
  int64_t decode_min_m = 0;
  int64_t decode_max_m = 0;
  int64_t decode_split_k_max_m = 0;  // the split-K decode schedule up to it, over every other schedule
  int64_t pair_exchange_min_m = 0;  // applies at W = 2 only
  int64_t owner_exchange_min_m = 0;
  int64_t band_scatter_min_m = 0;
};

// Which schedule runs matmul_all_reduce (M rows, K_r columns of A per rank, on `gpu`) when
// the tile GEMM can run at all.
inline MatmulAllReduceAlgo choose_matmul_all_reduce(int64_t m, int64_t k, int world, GpuClass gpu,
                                                    const MatmulAllReduceOverrides& o = {}) {
  auto pick = [](int64_t override_value, int64_t table_value) {
    return override_value > 0 ? override_value : table_value;
  };
  if (m <= o.decode_split_k_max_m) return MatmulAllReduceAlgo::kDecodeSplitK;
  const int64_t bp_min_k = pick(o.band_pull_min_k, band_pull_min_k(world));
  if (m >= pick(o.band_scatter_min_m, band_scatter_min_m(world, k)) && k >= bp_min_k)
    return MatmulAllReduceAlgo::kBandScatter;
  if (m >= pick(o.band_pull_min_m, band_pull_min_m(world, k, gpu)) && k >= bp_min_k)
    return MatmulAllReduceAlgo::kBandPull;
  if (world == 2 && m >= pick(o.pair_exchange_min_m, pair_exchange_min_m(world, k, gpu)))
    return MatmulAllReduceAlgo::kPairExchange;
  if (m >= pick(o.owner_exchange_min_m, owner_exchange_min_m(world, k, gpu)))
    return MatmulAllReduceAlgo::kOwnerExchange;
  if (m >= pick(o.decode_min_m, decode_min_m(world, gpu)) && m <= pick(o.decode_max_m, decode_max_m(world, k, gpu)))
    return MatmulAllReduceAlgo::kDecodePush;
  if (m <= decode_split_k_max_m(world, gpu)) return MatmulAllReduceAlgo::kDecodeSplitK;
  return m >= pick(o.fused_min_m, fused_min_m(world)) && k <= fused_max_k(world) ? MatmulAllReduceAlgo::kFusedTiles
                                                                                : MatmulAllReduceAlgo::kSequential;
}

// Consumer CTAs that run beside the GEMM (the GEMM keeps the other SMs). Best of
// {8, 16, 32, 48} at W = 2 and 4: the all-reduce-heavy o_proj at W = 4 (K_r = 2048)
// wants 48, the rest 32.
inline int consumer_blocks(int world, int64_t k, int override_blocks = 0) {
  if (override_blocks > 0) return override_blocks;
  (void)world;
  return k <= 2048 ? 48 : 32;
}

// Owner mode: tiles a consumer CTA pushes between two rounds of flag releases
// (each round waits until the CTA's pushes landed). Best of {1, 4, 16} at W = 2, 4.
inline int owner_group_tiles(int world, int64_t k, int override_tiles = 0) {
  if (override_tiles > 0) return override_tiles;
  (void)world;
  return k <= 2048 ? 4 : 1;
}

// Chunked schedule (cuBLAS per row chunk, each chunk's all-reduce beside the next
// GEMM): rows per chunk, whole 128-row GEMM tiles, about `chunks` chunks. Untuned.
inline int64_t chunk_rows(int64_t m, int world, int64_t override_chunks = 0) {
  (void)world;
  const int64_t chunks = override_chunks > 0 ? override_chunks : 4;
  const int64_t rows = (m + chunks - 1) / chunks;
  return (rows + 127) / 128 * 128;
}

// Band schedules: tile rows per band (and per group of the GEMM's tile order, so
// that bands complete in order), about `bands` bands per call, at most 8 tile rows:
// 16 bands at W = 2 from 64 tile rows (M = 8192 with 128-row tiles), else 8. The
// persistent SM-pull kernel (v13), 16 vs 8 bands at M = 8192: W = 2 o_proj 852 vs 886 us
// and down_proj 2618 vs 2658 (4 x H200; 4 x H100 885 vs 908, 2659 vs 2714); W = 4 o_proj
// 805 vs 770 (H200), down_proj 1473 vs 1474. At M = 4096 8 bands win (W = 2 o_proj 442
// vs 469). W > 4: untuned.
inline int band_tile_rows(int64_t tiles_m, int world, int64_t override_bands = 0) {
  const int64_t bands = override_bands > 0 ? override_bands : world <= 2 && tiles_m >= 64 ? 16 : 8;
  const int64_t rows = (tiles_m + bands - 1) / bands;
  return int(rows < 1 ? 1 : rows > 8 ? 8 : rows);
}
// The owner-scatter schedule's bands: the same, rounded up to a multiple of W tile rows,
// so that every rank owns as many tile rows of each full band (its shard, whole tile
// rows) and takes as many of the tiles the GEMM scatters.
inline int scatter_band_tile_rows(int64_t tiles_m, int world, int64_t override_bands = 0) {
  const int rows = band_tile_rows(tiles_m, world, override_bands);
  return (rows + world - 1) / world * world;
}

// Band schedules: CTAs of each band's sum (the GEMM keeps the other SMs). SM-pull,
// best of {4, 6, 8, 12, 16, 24, 32, 48}, 4 x H100 unless noted: the longer the GEMM
// per band, the fewer:
//   4   K_r >= 14336 (down_proj W = 2; 4 x H200: M = 8192 / 16384 2656 / 5275 us vs
//       2752 / 5394 at 6 and 2703 / 5579 at 8)
//   8   K_r >= 7168 and M >= 8192 (down_proj W = 4 M = 8192: 1438 vs 1490 at 12, 1579
//       at 6, 1930 at 4)
//   14  W = 2, K_r < 7168, M >= 16384 (o_proj: bands of 8 tile rows, twice the GEMM per
//       band of M = 8192; 4 x H200, two runs: 1712.8 / 1718.0 us vs 1724.2 / 1727.7 at 12
//       and 1766.8 / 1777.6 at 16; 2 x H100 1738.6 / 1742.7 vs 1754.9 / 1758.7 at 16; at
//       M = 8192 16 stays ahead, 883 vs 899 at 14)
//   16  elsewhere: M = 4096 (down_proj W = 4: 760 vs 768 at 12, 815 at 8) and o_proj
//       (W = 2: 882 vs 1072 at 8, 908 at 24; W = 4: 884 at 16 and 24, 890 at 32).
// The copy-engine schedule: 16. W > 4: untuned.
inline int band_reduce_blocks(MatmulAllReduceAlgo algo, int world, int64_t m, int64_t k,
                              int override_blocks = 0) {
  if (override_blocks > 0) return override_blocks;
  if (algo != MatmulAllReduceAlgo::kBandPull && algo != MatmulAllReduceAlgo::kBandScatter) return 16;
  if (k >= 14336) return 4;
  if (k >= kLongGemmMinK) return m >= 8192 ? 8 : 16;
  return world <= 2 && m >= 16384 ? 14 : 16;
}

// Where the GEMM hides the band all-reduce (K_r >= 7168: down_proj; the long GEMM per
// band keeps the band CTAs ahead of it) and 8 or more band CTAs run: one fewer where
// that saves the GEMM a wave of tiles (`tiles` output tiles, each CTA taking every G-th,
// G = `sms` - CTAs; `sms`: the GEMM's and the band kernel's). W = 4 down_proj M = 16384
// on 132 SMs: 7 CTAs leave 125 for 4096 tiles, 33 waves, where 8 leave 124, 34 waves;
// 4 x H100, forced, two runs (benchmarks/NOTES.md, v24): 2776.0 / 2782.8 us vs 2804.2 /
// 2835.2 at 8, 2882.2 at 6 (33 waves too: too few CTAs), 2847.3 at 11 (34 waves); 4 x
// H200, forced, same run (NOTES.md, "Smaller bands"): 2763.3 at 7 vs 2790.8 / 2799.1 /
// 2804.9 / 2843.7 at 8 / 10 / 11 / 6, and M = 8192 1403.3 at 10 vs 1422.5 / 1441.1 at 8 / 7. Where
// no wave is saved, one fewer only adds to the tail: M = 8192 (17 waves at 7 and 8)
// 1449.1 vs 1444.7. Otherwise more, up to kWaveFreeBandCtas, while they cost the GEMM no
// wave: the band kernel beside the GEMM then falls less far behind it. W = 4 down_proj
// M = 8192: 122 GEMM CTAs take the 2048 tiles in the same 17 waves as 124; 4 x H200,
// forced, same run, 10 vs 8 CTAs (benchmarks/NOTES.md, v30): 1421.6 / 1423.4 / 1421.1 vs
// 1441.0 / 1438.5 / 1426.0-1468.0 us over three tail variants; v29's sweep, another host:
// 11 vs 8 1397.9 vs 1418.2 with the last-wave band (the default), but 1433.3 vs 1428.9
// without it and 1411.7 vs 1403.7 with 16 bands, so 10 at most. Where the all-reduce is
// the bottleneck (o_proj) every band CTA counts more than a wave: never there. No change
// with an override. Where the GEMM has 5 waves or fewer, up to a quarter of the SMs: W = 4
// down_proj M = 2048, 512 tiles take 5 waves on 103 to 127 CTAs; 4 x H100, forced, same run
// (v33): 16 / 20 / 24 / 29 CTAs 461.3 / 458.9 / 456.8 / 453.7 us.
inline bool gemm_hides_band_all_reduce(int64_t k) { return k >= kLongGemmMinK; }
constexpr int kWaveFreeBandCtas = 10;
constexpr int kFewWaves = 5;
inline int band_reduce_blocks_for_waves(int blocks, int64_t k, int64_t tiles, int sms, int override_blocks = 0) {
  if (override_blocks > 0 || blocks < 8 || !gemm_hides_band_all_reduce(k) || tiles <= 0) return blocks;
  auto waves = [&](int gemm_ctas) { return gemm_ctas > 0 ? (tiles + gemm_ctas - 1) / gemm_ctas : INT64_MAX; };
  if (waves(sms - blocks + 1) < waves(sms - blocks)) return blocks - 1;
  const int most = waves(sms - blocks) <= kFewWaves ? std::max(sms / 4, kWaveFreeBandCtas) : kWaveFreeBandCtas;
  // At most half the SMs, as band_reduce_blocks' callers allow.
  while (blocks < most && 2 * (blocks + 1) <= sms && waves(sms - blocks - 1) == waves(sms - blocks)) ++blocks;
  return blocks;
}

// Band schedules: the tile GEMM computes every tile whole, however its tiles fill the waves
// of its SMs - R CTAs, rather than split its last waves by K (stream-K): its split tiles
// are the last tile numbers, so their bands are all-reduced after the GEMM (benchmarks/
// NOTES.md, v27), and the split ranges read A and B at scattered K offsets, without the
// L2 reuse of a wave of whole tiles (v32: K = 7168 M = 2048 on 116 CTAs 486.6 us split,
// 369.1 whole). Of the benchmark rows only W = 4 M = 2048 (512 tiles on 116 CTAs) splits
// otherwise (v33). Override: 1 on, 2 off.
inline bool band_gemm_whole_tiles(int64_t override_value = 0) { return override_value != 2; }

// Band schedules: the tile GEMM's output tile (TileGemmParams::tile_shape; 0 by M; a
// shape whose flags do not fit, or ping-pong tiles with the epilogue's owner scatter, falls
// back to 0). The ping-pong 128x128 tiles (4) are faster alone from M = 2048 (1 x H200,
// K = 7168, M = 8192 / 16384: 1413.8 / 2772.3 us against 1456.1 / 2963.7 for 128x256) but
// lose beside the band kernel, whose traffic shares L2 with their third more loads per
// flop (NOTES.md, "The ping-pong tile GEMM"; 2 x H200, W = 2, band_pull, same run, 4 / by
// M: o_proj M = 2048 / 8192 279.3 / 898.0 against 267.3 / 865.1, down_proj 755.0 / 2746.0
// against 687.6 / 2611.3; 4 x H200, W = 4, down_proj M = 8192 / 16384, 3 / 4: 1388.9 /
// 2743.6 against 1462.9 / 2878.5). Override: a tile shape, 1-4.
inline int band_tile_shape(int64_t override_value = 0) {
  return override_value > 0 ? static_cast<int>(override_value) : 0;
}

// SM-pull band schedule: one persistent kernel for every band (per-CTA flags, no
// launch or grid-wide arrival per band) rather than one kernel per band (v13; same
// runs, 8 bands, persistent vs per band: W = 4 o_proj M = 8192 / 16384 781 / 1472 vs
// 895 / 1701 us on 4 x H100; W = 2 o_proj M = 4096 442 vs 463 on 4 x H200; down_proj
// within 1 %; the one row where per band wins: W = 2 o_proj M = 16384, 1714 vs 1677
// on H200). Override: 1 on, 2 off.
inline bool band_pull_persistent(int64_t override_value = 0) { return override_value != 2; }

// SM-pull band schedule, persistent kernel: the last bands, summed and gathered after
// the GEMM by a second kernel of more CTAs on the SMs the GEMM frees (lane 1 of
// band_all_reduce.h). Where the GEMM is the bottleneck (K_r >= 7168: down_proj) the R
// band CTAs beside it (4 or 8) keep up with it, but what its last wave of tiles
// completes all at once (`wave_tile_rows`: GEMM CTAs / tiles per row, rounded up) is
// left to them after it: those bands go to the second kernel. 4 x H100, W = 2
// down_proj (bands of 4 tile rows, 4-row waves), M = 4096 / 8192 with 0 / 1 / 2 bands:
// 1346 / 1295 / 1332 and 2631 / 2575 / 2610 us; M = 2048 (bands of 2 rows): 729 / 690 /
// 684. o_proj (all-reduce-bound, 16 CTAs already) gains nothing (W = 2 M = 4096 / 8192:
// 465 / 889 with none, 469 / 889 with one): none. Override: N > 0 for the last N - 1
// bands (1: none); at most all bands but one.
// The split between the two tails below: where the GEMM hides the band all-reduce
// (K_r >= 7168: down_proj) the second band kernel takes the last wave's bands, elsewhere
// the two-shot all-reduce takes a share of the bands.
inline int band_tail_bands(int64_t k, int64_t bands, int64_t band_tile_rows, int64_t wave_tile_rows,
                           int64_t override_value = 0) {
  const int64_t wave_bands = band_tile_rows > 0 ? (wave_tile_rows + band_tile_rows - 1) / band_tile_rows : 1;
  const int64_t tail = override_value > 0 ? override_value - 1 : gemm_hides_band_all_reduce(k) ? wave_bands : 0;
  return int(tail < bands - 1 ? tail : bands - 1);
}
// The GEMM's last wave as a band of its own (and the tile order's last group): where the
// GEMM hides the band all-reduce (K_r >= 7168), all that is left after the GEMM is the
// band holding its last tiles (band_tail_bands), and with bands of band_tile_rows rows
// that band also holds tiles that ended a wave or two earlier. With the last wave's tile
// rows as the last band, the band before it ends a wave before the GEMM and is summed
// beside it. `tiles` output tiles, `tiles_n` per tile row, each of `gemm_ctas` CTAs taking
// every G-th. Returns the last band's tile rows, or 0 (none: the last wave fills whole
// bands, or the all-reduce is the bottleneck, or at W >= 3 fewer than 8 band CTAs run).
// 4 x H200, forced band_pull, two runs on two hosts, off / on (benchmarks/NOTES.md, v29):
// W = 4 down_proj M = 4096 744.9 / 738.1 and 751.7 / 744.0 us, M = 8192 1423.3 / 1410.3 and
// 1428.9 / 1418.2, W = 2 down_proj M = 16384 5409.5 / 5372.5; but W = 4 M = 16384 (7 band
// CTAs) 2740.5 / 2756.5, 2855.4 / 2869.5 and 2846.0 / 2894.4: there the band kernel beside
// the GEMM (lane 0) keeps up with too little slack to take the band before the last in the
// GEMM's last wave, and ends ~100 us after the GEMM either way. Override: 1 on (any K and
// CTAs), 2 off.
inline int last_wave_band_tile_rows(int64_t k, int64_t tiles, int gemm_ctas, int64_t tiles_n,
                                    int64_t band_tile_rows, int world, int band_ctas,
                                    int64_t override_value = 0) {
  if (override_value == 2) return 0;
  if (override_value != 1 && (!gemm_hides_band_all_reduce(k) || (world >= 3 && band_ctas < 8))) return 0;
  if (tiles <= 0 || gemm_ctas <= 0 || tiles_n <= 0) return 0;
  const int64_t last_wave_tiles = tiles - (tiles - 1) / gemm_ctas * gemm_ctas;
  const int64_t rows = (last_wave_tiles + tiles_n - 1) / tiles_n;
  return rows < band_tile_rows && rows < tiles / tiles_n ? int(rows) : 0;
}

// Or the last bands all-reduced by the two-shot all-reduce (pushes, two_shot_blocks CTAs on
// the SMs the GEMM frees), which moves more than the band kernel on any CTA count (4 x H100,
// W = 4, 128 MB: ~327 against ~276 GB/s): where the all-reduce is not hidden by a long GEMM
// (K_r < 7168). 4 x H200, forced columns, same runs (benchmarks/NOTES.md, v21), W = 4 o_proj
// (8 bands) M = 2048 / 4096 with the last 3: 242.3 / 416.9 us vs 269.4 / 445.7 without, and
// vs sequential 255.0 and fused_tiles 437.7; M = 8192 782.3 vs 784.3; M = 16384 (16 bands)
// with the last 6: 1467.7 vs 1481.4. W = 2 o_proj with the last 1 (8 or 16 bands): M = 4096 /
// 8192 / 16384 455.9 / 887.0 / 1764.8 vs 467.4 / 907.6 / 1791.8. Where the GEMM is the
// bottleneck (down_proj) the second band kernel (band_tail_bands) is as fast: W = 4 M = 8192
// 1463.1 vs 1465.5. Across hosts the W = 2 gain is within their spread (the H200 runs of
// record: level with the record before). Override: 1 on, 2 off.
inline bool band_tail_two_shot(int64_t k, int64_t override_value = 0) {
  if (override_value > 0) return override_value == 1;
  return !gemm_hides_band_all_reduce(k);
}
// How many: at W >= 3 three eighths of the bands (the all-reduce is ~1.6x the GEMM: the band
// kernel keeps up with the first bands beside it; more in the tail leave its CTAs idle, fewer
// leave it behind: W = 4 o_proj M = 4096, the last 2 / 3 / 4 / 6 of 8: 425.4 / 416.9 / 421.8 /
// 466.9 us), at W = 2 one (M = 8192, 1 / 2 / 4 of 16: 887.0 / 913.9 / 957.8). At most all bands
// but one. Override: N > 0 for the last N - 1 (the band_tail key).
inline int band_two_shot_tail_bands(int world, int64_t bands, int64_t override_value = 0) {
  const int64_t tail = override_value > 0 ? override_value - 1 : world <= 2 ? 1 : (3 * bands + 4) / 8;
  return int(tail < bands - 1 ? tail : bands - 1);
}
// CTAs of that kernel (the band kernel alone moves most at 16: W = 4 o_proj M = 8192 on
// 4 x H100, serialized, 697 / 753 / 739 us at 16 / 32 / 64 CTAs).
inline int band_tail_blocks(int override_blocks = 0) { return override_blocks > 0 ? override_blocks : 16; }

// Persistent band kernel: bands a CTA may have summed but not yet gathered. 1: it
// gathers each band right after summing it; 2: it sums band b + 1 before it gathers b
// when b + 1 is out (the all-reduce-bound order of band_all_reduce.h). 4 x H100, same
// run, 1 / 2 / 3 / 4: W = 4 o_proj M = 8192 781 / 813 / 807 / 816 us, M = 16384 1472 /
// 1496 / 1492 / 1498; W = 4 down_proj and W = 2 o_proj within 0.3 %; the band kernel
// alone (serialized) 1112 / 1116 / 1115 / 1116: it is the GEMM beside it that makes the
// later gather slower (the peers' sums leave their L2 in the meantime, presumably).
inline int band_sum_ahead(int override_value = 0) { return override_value > 0 ? override_value : 1; }

// The sequential schedule under graph capture: its all-reduce on the side stream, between
// a fork and a join, instead of right behind the cuBLAS GEMM on the caller's stream.
// 4 x H200, graph, same run (NOTES.md, "The sequential schedule's all-reduce on a side
// stream"), same stream / side stream, µs: W = 4 o_proj M = 1 / 32 / 128 / 512 16.1 / 19.8 /
// 27.9 / 72.3 vs 15.7 / 19.4 / 27.5 / 71.8, down_proj M = 128 49.2 vs 48.7; W = 2 o_proj M =
// 1 / 128 22.7 / 33.3 vs 22.2 / 32.8, down_proj M = 1 / 128 / 512 60.5 / 72.6 / 190.8 vs 60.4 /
// 72.1 / 190.3: never slower, the stream's priority no matter, PDL on (off: 0.1-0.7 µs
// back). Eager calls keep one stream (unmeasured; the fork and join cost host time).
// Override: 1 on, 2 off.
inline bool sequential_all_reduce_on_side_stream(int64_t override_value = 0) { return override_value != 2; }

// CTAs of each chunk's two-shot all-reduce (the GEMM keeps the other SMs). Untuned.
inline int chunk_all_reduce_blocks(int world, int override_blocks = 0) {
  (void)world;
  return override_blocks > 0 ? override_blocks : 32;
}

}  // namespace distfuse
