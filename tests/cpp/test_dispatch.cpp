// Dispatch decisions and the workspace layout: pure functions every rank must
// evaluate identically.
#include <gtest/gtest.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "distfuse/check.h"
#include "distfuse/comm/handle.h"
#include "distfuse/params.h"
#include "distfuse/tuning.h"
#include "kernels/allreduce/band_geometry.h"
#include "kernels/gemm/decode_matmul_all_reduce.h"
#include "kernels/gemm/tile_order.h"

namespace distfuse {
namespace {

constexpr GpuClass kH100 = GpuClass::kH100;
using O = MatmulAllReduceOverrides;

// The schedule table with some entries overridden, e.g. overrides({{&O::decode_max_m, 512}}).
O overrides(std::initializer_list<std::pair<int64_t O::*, int64_t>> entries) {
  O o;
  for (const auto& [field, value] : entries) o.*field = value;
  return o;
}

TEST(AllReduceChoice, SmallIsOneShotLargeIsTwoShot) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    const int64_t threshold = one_shot_threshold_bytes(world);
    EXPECT_EQ(choose_all_reduce(4096, world, kOneShotCapacityBytes), AllReduceAlgo::kOneShot);
    EXPECT_EQ(choose_all_reduce(threshold, world, kOneShotCapacityBytes), AllReduceAlgo::kOneShot);
    EXPECT_EQ(choose_all_reduce(threshold + 1, world, kOneShotCapacityBytes),
              AllReduceAlgo::kTwoShot);
    EXPECT_EQ(choose_all_reduce(256ll << 20, world, kOneShotCapacityBytes), AllReduceAlgo::kTwoShot);
  }
}

TEST(AllReduceChoice, OverrideIsClampedToTheOneShotCapacity) {
  EXPECT_EQ(choose_all_reduce(8 << 20, 2, kOneShotCapacityBytes, 64 << 20), AllReduceAlgo::kTwoShot);
  EXPECT_EQ(choose_all_reduce(kOneShotCapacityBytes, 2, kOneShotCapacityBytes, 64 << 20),
            AllReduceAlgo::kOneShot);
  EXPECT_EQ(choose_all_reduce(8192, 4, kOneShotCapacityBytes, 4096), AllReduceAlgo::kTwoShot);
}

TEST(AllReduceChoice, LaunchOptionsAndTheirOverrides) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    EXPECT_EQ(one_shot_lines_per_thread(world), 1);
    EXPECT_TRUE(dependent_launch(world));
  }
  EXPECT_EQ(one_shot_lines_per_thread(4, 2), 2);
  EXPECT_EQ(one_shot_lines_per_thread(4, 7), 1);
  EXPECT_TRUE(dependent_launch(4, 1));
  EXPECT_FALSE(dependent_launch(4, 2));
}

TEST(AllReduceChoice, LLTwoShotBetweenOneShotAndTwoShotFromThreeRanks) {
  const int64_t ll_capacity = 4 << 20;
  EXPECT_EQ(choose_all_reduce(one_shot_threshold_bytes(4) + 16, 4, kOneShotCapacityBytes, 0, ll_capacity),
            AllReduceAlgo::kTwoShotLL);
  EXPECT_EQ(choose_all_reduce(two_shot_ll_max_bytes(4), 4, kOneShotCapacityBytes, 0, ll_capacity),
            AllReduceAlgo::kTwoShotLL);
  EXPECT_EQ(choose_all_reduce(two_shot_ll_max_bytes(4) + 16, 4, kOneShotCapacityBytes, 0, ll_capacity),
            AllReduceAlgo::kTwoShot);
  EXPECT_EQ(two_shot_ll_max_bytes(2), 0);  // W = 2: the one-shot covers the mid sizes
  // Clamped to what the LL region holds, and an override wins.
  EXPECT_EQ(choose_all_reduce(3 << 20, 4, kOneShotCapacityBytes, 0, 2 << 20, 8 << 20), AllReduceAlgo::kTwoShot);
  EXPECT_EQ(choose_all_reduce(3 << 20, 4, kOneShotCapacityBytes, 0, 4 << 20, 8 << 20), AllReduceAlgo::kTwoShotLL);
}

TEST(AllReduceChoice, LL128TwoShotOnlyWhereTheGroupAllowsItsLines) {
  const int64_t ll_capacity = 4 << 20, ll128_capacity = 4 * 17920 * 120;
  const int64_t mid = one_shot_threshold_bytes(4) + 16;
  // Allowed (capacity > 0): the LL128 two-shot takes the mid sizes up to its limit.
  EXPECT_EQ(choose_all_reduce(mid, 4, kOneShotCapacityBytes, 0, ll_capacity, 0, ll128_capacity),
            AllReduceAlgo::kTwoShotLL128);
  EXPECT_EQ(choose_all_reduce(two_shot_ll128_max_bytes(4), 4, kOneShotCapacityBytes, 0, ll_capacity, 0,
                              ll128_capacity),
            AllReduceAlgo::kTwoShotLL128);
  EXPECT_EQ(choose_all_reduce(two_shot_ll128_max_bytes(4) + 16, 4, kOneShotCapacityBytes, 0, ll_capacity, 0,
                              ll128_capacity),
            AllReduceAlgo::kTwoShot);
  // Not allowed (capacity 0): the LL two-shot's range as before.
  EXPECT_EQ(choose_all_reduce(mid, 4, kOneShotCapacityBytes, 0, ll_capacity, 0, 0), AllReduceAlgo::kTwoShotLL);
  // The one-shot keeps the small sizes; at W = 2 LL128 takes part of the one-shot's
  // range where allowed, and the limit is clamped to what the region holds while an
  // override wins.
  for (int world = 2; world <= kMaxWorld; ++world) {
    EXPECT_EQ(choose_all_reduce(two_shot_ll128_min_bytes(world), world, kOneShotCapacityBytes, 0, ll_capacity, 0,
                                ll128_capacity),
              AllReduceAlgo::kOneShot);
    EXPECT_LE(two_shot_ll128_min_bytes(world), one_shot_threshold_bytes(world));
  }
  EXPECT_EQ(choose_all_reduce(1 << 20, 2, kOneShotCapacityBytes, 0, ll_capacity, 0, ll128_capacity),
            AllReduceAlgo::kTwoShotLL128);
  EXPECT_EQ(choose_all_reduce(1 << 20, 2, kOneShotCapacityBytes, 0, ll_capacity, 0, 0), AllReduceAlgo::kOneShot);
  EXPECT_EQ(choose_all_reduce(two_shot_ll128_max_bytes(2) + 16, 2, kOneShotCapacityBytes, 0, ll_capacity, 0,
                              ll128_capacity),
            AllReduceAlgo::kTwoShot);
  EXPECT_EQ(choose_all_reduce(ll128_capacity + 16, 4, kOneShotCapacityBytes, 0, ll_capacity, 0, ll128_capacity,
                              64 << 20),
            AllReduceAlgo::kTwoShot);
  EXPECT_EQ(choose_all_reduce(3 << 20, 4, kOneShotCapacityBytes, 0, ll_capacity, 0, ll128_capacity, 4 << 20),
            AllReduceAlgo::kTwoShotLL128);
  // W = 4: the whole region (the 8 MB output of M = 512 rows fits); W = 3 stays at 4 MB.
  EXPECT_EQ(two_shot_ll128_max_bytes(4), ll128_capacity);
  EXPECT_EQ(choose_all_reduce(8 << 20, 4, kOneShotCapacityBytes, 0, ll_capacity, 0, ll128_capacity),
            AllReduceAlgo::kTwoShotLL128);
  EXPECT_EQ(choose_all_reduce((4 << 20) + 16, 3, kOneShotCapacityBytes, 0, ll_capacity, 0, 3 * 17920 * 120),
            AllReduceAlgo::kTwoShot);
}

TEST(AllReduceChoice, LL128OneShotBeforeTheOtherRangesWhereAllowed) {
  const int64_t ll_capacity = 4 << 20, one_capacity = 2 * 17920 * 120;
  // `allowed`: the group allows LL128 lines (both LL128 capacities > 0), else both 0.
  auto choose = [&](int64_t bytes, int world, bool allowed, int64_t override_max = 0) {
    return choose_all_reduce(bytes, world, kOneShotCapacityBytes, 0, ll_capacity, 0,
                             allowed ? world * 17920 * 120 : 0, 0, allowed ? one_capacity : 0, override_max);
  };
  // W = 2: above the LL one-shot's smallest sizes up to 3 MB; the LL128 two-shot above.
  EXPECT_EQ(choose(one_shot_ll128_min_bytes(2), 2, true), AllReduceAlgo::kOneShot);
  EXPECT_EQ(choose(one_shot_ll128_min_bytes(2) + 16, 2, true), AllReduceAlgo::kOneShotLL128);
  EXPECT_EQ(choose(3 << 20, 2, true), AllReduceAlgo::kOneShotLL128);
  EXPECT_EQ(choose((3 << 20) + 16, 2, true), AllReduceAlgo::kTwoShotLL128);
  // W = 4: every size up to 256 KB, where the LL128 two-shot takes over.
  EXPECT_EQ(choose(16, 4, true), AllReduceAlgo::kOneShotLL128);
  EXPECT_EQ(choose(256 << 10, 4, true), AllReduceAlgo::kOneShotLL128);
  EXPECT_EQ(choose((256 << 10) + 16, 4, true), AllReduceAlgo::kTwoShotLL128);
  // Not allowed: the LL one-shot as before; W > 4 (untuned): off.
  EXPECT_EQ(choose(16, 4, false), AllReduceAlgo::kOneShot);
  EXPECT_EQ(choose(1 << 20, 2, false), AllReduceAlgo::kOneShot);
  EXPECT_EQ(choose(16, 8, true), AllReduceAlgo::kOneShot);
  // An override wins, clamped to what the region holds.
  EXPECT_EQ(choose(4 << 20, 2, true, 8 << 20), AllReduceAlgo::kOneShotLL128);
  EXPECT_EQ(choose(one_capacity + 16, 2, true, 8 << 20), AllReduceAlgo::kTwoShot);
}

TEST(WorkspaceLayout, LL128GridsOnlyWhereTheyAreResidentAtOnce) {
  EXPECT_TRUE(ll128_grid_fits(132));   // H100 SXM, H200
  EXPECT_TRUE(ll128_grid_fits(128));
  EXPECT_FALSE(ll128_grid_fits(127));
  EXPECT_FALSE(ll128_grid_fits(114));  // H100 PCIe
  EXPECT_EQ(kLL128MaxBlocks % kLL128BlocksPerSm, 0);
}

TEST(WorkspaceLayout, LL128RegionHoldsItsLinesAndIsZeroedWithTheFlags) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    const WorkspaceLayout l = make_layout(world, 0);
    EXPECT_EQ(l.twoshot_ll128_bytes, 2ull * 2 * world * kTwoShotLL128LinesPerSlot * kLL128LineBytes);
    EXPECT_EQ(l.twoshot_ll128_offset % kLL128LineBytes, 0u);
    EXPECT_GE(l.twoshot_ll128_offset, l.decode_ll_offset + l.decode_ll_bytes);
    // The workspace clears [0, twoshot_offset) at creation: the LL128 lines are inside.
    EXPECT_LE(l.twoshot_ll128_offset + l.twoshot_ll128_bytes, l.twoshot_offset);
  }
  // A shard of 2 MB fits (W = 2 at 4 MB, the largest default range).
  EXPECT_GE(kTwoShotLL128LinesPerSlot * kLL128PayloadBytes, uint64_t(2) << 20);
}

TEST(AllReduceChoice, TwoShotBlocksFitTheRegion) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    EXPECT_GE(two_shot_blocks(world), 1);
    EXPECT_LE(two_shot_blocks(world), kTwoShotMaxBlocks);
  }
  EXPECT_EQ(two_shot_blocks(4, 16), 16);
}

TEST(MatmulAllReduceChoice, BandPullFromLargeM) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    for (int64_t k : {band_pull_min_k(world), int64_t(7168), int64_t(14336)}) {
      const int64_t min_m = band_pull_min_m(world, k, kH100);
      EXPECT_EQ(choose_matmul_all_reduce(min_m, k, world, kH100), MatmulAllReduceAlgo::kBandPull);
      EXPECT_NE(choose_matmul_all_reduce(min_m - 1, k, world, kH100), MatmulAllReduceAlgo::kBandPull);
    }
    EXPECT_NE(choose_matmul_all_reduce(16384, band_pull_min_k(world) - 8, world, kH100), MatmulAllReduceAlgo::kBandPull);
  }
  // Llama-3-70B: every M >= 4096 row; on H200 also o_proj at W = 4 M = 2048 (K_r = 2048,
  // its last bands in the two-shot all-reduce).
  for (int64_t k : {2048, 4096, 7168, 14336}) EXPECT_EQ(choose_matmul_all_reduce(8192, k, 4, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(4096, 2048, 4, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(4096, 7168, 4, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(16384, 4096, 2, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(8192, 4096, 2, kH100), MatmulAllReduceAlgo::kPairExchange);  // W = 2 o_proj
  EXPECT_EQ(choose_matmul_all_reduce(4096, 14336, 2, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 7168, 4, GpuClass::kH200), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(2047, 7168, 4, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 7168, 3, GpuClass::kH200), MatmulAllReduceAlgo::kOwnerExchange);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 7168, 4, GpuClass::kOther), MatmulAllReduceAlgo::kOwnerExchange);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 7168, 4, kH100), MatmulAllReduceAlgo::kBandPull);  // v33
  EXPECT_EQ(choose_matmul_all_reduce(2047, 7168, 4, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 2048, 4, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 2048, 4, GpuClass::kH200), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(2047, 2048, 4, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 2048, 3, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);  // W = 3: untuned
  EXPECT_EQ(choose_matmul_all_reduce(2048, 14336, 2, kH100), MatmulAllReduceAlgo::kPairExchange);  // W = 2 down_proj
  const O small_bands = overrides({{&O::band_pull_min_m, 100}, {&O::band_pull_min_k, 64}});
  EXPECT_EQ(choose_matmul_all_reduce(100, 64, 2, kH100, small_bands), MatmulAllReduceAlgo::kBandPull);
  EXPECT_TRUE(band_pull_persistent());

  EXPECT_FALSE(band_pull_persistent(2));
  for (auto algo : {MatmulAllReduceAlgo::kBandPull, MatmulAllReduceAlgo::kCopyEngine})
    for (int64_t k : {2048, 7168}) EXPECT_GE(band_reduce_blocks(algo, 4, 8192, k), 1);
  EXPECT_EQ(band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 8192, 7168, 3), 3);
  // Fewer band CTAs where the GEMM per band is longer.
  EXPECT_LT(band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 2, 8192, 14336),
            band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 8192, 7168));
  EXPECT_LT(band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 8192, 7168),
            band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 4096, 7168));
  EXPECT_LT(band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 2, 16384, 4096),
            band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 2, 8192, 4096));
  EXPECT_EQ(band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 16384, 2048),
            band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 8192, 2048));
  // The tail kernel takes at most all bands but one, and none when told 1.
  for (int64_t bands : {1, 2, 8, 16})
    for (int64_t override_value : {0, 1, 2, 4, 100}) {
      const int tail = band_tail_bands(7168, bands, 8, 4, override_value);
      EXPECT_GE(tail, 0);
      EXPECT_LE(tail, bands - 1);
      if (override_value == 1) EXPECT_EQ(tail, 0);
    }
  EXPECT_EQ(band_tail_bands(7168, 8, 8, 4, 3), 2);
  // GEMM-bound: the bands of the GEMM's last wave (4 tile rows) after the GEMM.
  EXPECT_EQ(band_tail_bands(14336, 8, 4, 4), 1);
  EXPECT_EQ(band_tail_bands(14336, 8, 2, 4), 2);
  EXPECT_EQ(band_tail_bands(7168, 8, 8, 4), 1);
  EXPECT_EQ(band_tail_bands(2048, 8, 8, 4), 0);  // all-reduce-bound: none
  EXPECT_EQ(band_tail_blocks(), 16);
  EXPECT_EQ(band_tail_blocks(24), 24);
  // The two-shot tail where the GEMM does not hide the all-reduce (K_r < 7168).
  EXPECT_TRUE(band_tail_two_shot(2048));
  EXPECT_TRUE(band_tail_two_shot(4096));
  EXPECT_FALSE(band_tail_two_shot(7168));
  EXPECT_TRUE(band_tail_two_shot(14336, 1));
  EXPECT_FALSE(band_tail_two_shot(2048, 2));
  EXPECT_EQ(band_two_shot_tail_bands(4, 8), 3);
  EXPECT_EQ(band_two_shot_tail_bands(4, 16), 6);
  EXPECT_EQ(band_two_shot_tail_bands(2, 16), 1);
  EXPECT_EQ(band_two_shot_tail_bands(4, 8, 5), 4);
  for (int world : {2, 3, 4, 8})
    for (int64_t bands : {1, 2, 3, 8, 16})
      for (int64_t override_value : {0, 1, 2, 100}) {
        const int tail = band_two_shot_tail_bands(world, bands, override_value);
        EXPECT_GE(tail, 0);
        EXPECT_LE(tail, bands - 1);
        if (override_value == 1) EXPECT_EQ(tail, 0);
      }
  EXPECT_EQ(band_sum_ahead(), 1);
  EXPECT_EQ(band_sum_ahead(3), 3);
  for (int world : {2, 4})
    for (int64_t tiles_m : {1, 7, 64, 1000}) {
      EXPECT_GE(band_tile_rows(tiles_m, world), 1);
      EXPECT_LE(band_tile_rows(tiles_m, world), 8);
    }
  EXPECT_EQ(band_tile_rows(64, 2), 4);  // 16 bands at W = 2, M = 8192
  EXPECT_EQ(band_tile_rows(64, 4), 8);
}

TEST(MatmulAllReduceChoice, DecodeThenSequentialUnlessLargeMAndModestK) {
  for (int world : {2, 4, 8}) {
    const int64_t lo = decode_min_m(world, kH100), hi = decode_max_m(world, 2048, kH100);
    EXPECT_EQ(choose_matmul_all_reduce(lo, 2048, world, kH100), lo <= hi ? MatmulAllReduceAlgo::kDecodePush
                                                                         : MatmulAllReduceAlgo::kSequential);
    EXPECT_EQ(choose_matmul_all_reduce(hi + 1, 7168, world, kH100), MatmulAllReduceAlgo::kSequential);
    if (lo > 1) EXPECT_EQ(choose_matmul_all_reduce(lo - 1, 2048, world, kH100), MatmulAllReduceAlgo::kSequential);
  }
  // H100 at W >= 3: the unfused order below M = 4 (its LL128 one-shot all-reduce caught
  // up there); the override takes the decode schedule down to M = 1 again.
  EXPECT_EQ(decode_min_m(4, kH100), 4);
  EXPECT_EQ(decode_min_m(2, kH100), 1);
  EXPECT_EQ(decode_min_m(4, GpuClass::kH200), 1);
  EXPECT_EQ(choose_matmul_all_reduce(1, 2048, 4, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(3, 7168, 4, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(4, 2048, 4, kH100), MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(1, 2048, 4, kH100, overrides({{&O::decode_min_m, 1}})),
            MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(1, 2048, 4, GpuClass::kH200), MatmulAllReduceAlgo::kDecodePush);
  // The split-K decode schedule: never from the table; an override takes it up to its M
  // over every other schedule.
  EXPECT_EQ(decode_split_k_max_m(2, GpuClass::kH200), 0);
  EXPECT_EQ(choose_matmul_all_reduce(4096, 2048, 4, kH100, overrides({{&O::decode_split_k_max_m, 4096}})),
            MatmulAllReduceAlgo::kDecodeSplitK);
  EXPECT_EQ(choose_matmul_all_reduce(4097, 2048, 4, kH100, overrides({{&O::decode_split_k_max_m, 4096}})),
            MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(300, 2048, 4, kH100, overrides({{&O::decode_max_m, 512}})),
            MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(513, 2048, 4, kH100, overrides({{&O::decode_max_m, 512}})),
            MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(decode_max_m(2, 14336, kH100), 0);
  EXPECT_EQ(choose_matmul_all_reduce(16, 2048, 4, kH100), MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(17, 2048, 4, kH100), MatmulAllReduceAlgo::kSequential);
  // The decode schedule only where it was measured to win: up to M = 16 on H100 and H200,
  // and at W = 2 up to M = 8 on H200 where K_r >= 7168.
  EXPECT_EQ(gpu_class("NVIDIA H100 80GB HBM3"), GpuClass::kH100);
  EXPECT_EQ(gpu_class("NVIDIA H200"), GpuClass::kH200);
  EXPECT_EQ(gpu_class("mixed"), GpuClass::kOther);
  EXPECT_EQ(gpu_class("NVIDIA A100-SXM4-80GB"), GpuClass::kOther);
  EXPECT_EQ(choose_matmul_all_reduce(16, 2048, 4, GpuClass::kH200), MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(17, 2048, 4, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(1, 7168, 2, GpuClass::kH200), MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(8, 14336, 2, GpuClass::kH200), MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(9, 14336, 2, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(1, 4096, 2, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(8, 4096, 2, GpuClass::kH200), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(1, 2048, 4, GpuClass::kOther), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(1, 2048, 4, GpuClass::kOther, overrides({{&O::decode_max_m, 16}})),
            MatmulAllReduceAlgo::kDecodePush);
  EXPECT_EQ(choose_matmul_all_reduce(16, 2048, 2, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_TRUE(decode_ll(4, 1, 8192 * 2, kDecodeLLCapacityBytes));
  EXPECT_FALSE(decode_ll(4, 8, 8 * 8192 * 2, kDecodeLLCapacityBytes));
  EXPECT_TRUE(decode_ll(2, 8, 8 * 8192 * 2, kDecodeLLCapacityBytes));
  EXPECT_FALSE(decode_ll(2, 8, 8 * 8192 * 2, kDecodeLLCapacityBytes, 2));
  EXPECT_FALSE(decode_ll(4, 8, kDecodeLLCapacityBytes + 16, kDecodeLLCapacityBytes, 1));
  EXPECT_FALSE(decode_ll(4, 64, 64 * 1024 * 2, kDecodeLLCapacityBytes));
  // LL128 lines: W >= 3 up to M = 16 where allowed and fitting; the override picks.
  EXPECT_TRUE(decode_ll128_fits(16, 8192));
  EXPECT_FALSE(decode_ll128_fits(32, 8192));
  EXPECT_TRUE(decode_ll128(4, 16, true));
  EXPECT_FALSE(decode_ll128(4, 17, true));
  EXPECT_FALSE(decode_ll128(2, 8, true));
  EXPECT_FALSE(decode_ll128(4, 8, false));
  EXPECT_FALSE(decode_ll128(4, 8, false, 3));
  EXPECT_TRUE(decode_ll128(2, 8, true, 3));
  EXPECT_FALSE(decode_ll128(4, 8, true, 1));
  EXPECT_FALSE(decode_ll128(4, 8, true, 2));
  // Where the band schedule and the tile exchanges are off (their smallest M raised), the
  // owner schedule from fused_min_m up to fused_max_k.
  constexpr int64_t kNever = int64_t(1) << 40;
  const O no_bands = overrides({{&O::band_pull_min_m, kNever}});
  const O no_bands_no_pairs = overrides({{&O::band_pull_min_m, kNever}, {&O::pair_exchange_min_m, kNever}});
  const O no_bands_no_owners = overrides({{&O::band_pull_min_m, kNever}, {&O::owner_exchange_min_m, kNever}});
  EXPECT_EQ(choose_matmul_all_reduce(fused_min_m(4) - 1, 2048, 4, kH100, no_bands), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(fused_min_m(4), 2048, 4, kH100, no_bands), MatmulAllReduceAlgo::kFusedTiles);
  EXPECT_EQ(choose_matmul_all_reduce(4096, fused_max_k(2), 2, kH100, no_bands_no_pairs),
            MatmulAllReduceAlgo::kFusedTiles);
  EXPECT_EQ(choose_matmul_all_reduce(4096, fused_max_k(2) + 8, 2, kH100, no_bands_no_pairs),
            MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(4096, fused_max_k(4), 4, kH100, no_bands_no_owners),
            MatmulAllReduceAlgo::kFusedTiles);
  EXPECT_EQ(choose_matmul_all_reduce(1000, 2048, 4, kH100, overrides({{&O::fused_min_m, 512}})),
            MatmulAllReduceAlgo::kFusedTiles);
  const O early_tiles_no_pairs = overrides({{&O::fused_min_m, 512}, {&O::pair_exchange_min_m, kNever}});
  EXPECT_EQ(choose_matmul_all_reduce(1000, 2048, 2, kH100, early_tiles_no_pairs), MatmulAllReduceAlgo::kFusedTiles);
  EXPECT_GT(consumer_blocks(4, 2048), 0);
  EXPECT_EQ(consumer_blocks(4, 2048, 7), 7);
  EXPECT_GE(owner_group_tiles(4, 7168), 1);
  EXPECT_EQ(owner_group_tiles(4, 7168, 3), 3);
}

TEST(WorkspaceLayout, RegionsAreOrderedAlignedAndDisjoint) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    const uint64_t tile_bytes = 3 << 20;
    const WorkspaceLayout l = make_layout(world, tile_bytes + 5);
    const uint64_t offsets[] = {l.counters_offset, l.flags_offset,     l.oneshot_offset, l.twoshot_ll_offset,
                                l.decode_ll_offset, l.twoshot_offset, l.tiles_offset};
    const uint64_t sizes[] = {l.counters_bytes, l.flags_bytes,   l.oneshot_bytes, l.twoshot_ll_bytes,
                              l.decode_ll_bytes, l.twoshot_bytes, l.tiles_bytes};
    for (int i = 0; i < 7; ++i) {
      EXPECT_EQ(offsets[i] % 16, 0u) << "region " << i;
      if (i + 1 < 7) EXPECT_LE(offsets[i] + sizes[i], offsets[i + 1]) << "region " << i;
    }
    // The LL regions are zeroed at creation: everything before the two-shot chunks.
    EXPECT_LE(l.decode_ll_offset + l.decode_ll_bytes, l.twoshot_offset);
    EXPECT_EQ(l.decode_ll_bytes, uint64_t(world) * (kDecodeLLCapacityBytes * 2 + kDecodeLL128BytesPerSlot));
    EXPECT_GE(l.tiles_bytes, tile_bytes + 5);
    EXPECT_EQ(l.total_bytes, l.tiles_offset + l.tiles_bytes);
    // Counters hold every channel's blocks and the per-tile counters.
    EXPECT_GE(l.counters_bytes, (uint64_t(kNumChannels) * kMaxBlocks + kMaxTiles) * 4);
    EXPECT_GE(l.flags_bytes, uint64_t(kNumChannels) * kFlagsPerChannel * 4);
    // One-shot: two CTA geometries x two parities of `world` slots of LL lines (16 bytes carry 8).
    EXPECT_EQ(l.oneshot_bytes, 2ull * 2ull * world * kOneShotCapacityBytes * 2);
  }
}

TEST(CommHandle, PointsIntoTheRightRegions) {
  static unsigned char buffers[2][1 << 12];
  CommHandle h{};
  h.peer_base[0] = buffers[0];
  h.peer_base[1] = buffers[1];
  h.rank = 1;
  h.world = 2;
  h.layout = make_layout(2, 0);
  EXPECT_EQ(reinterpret_cast<unsigned char*>(h.counters(kChannelTwoShot)),
            buffers[1] + h.layout.counters_offset + 4ull * kMaxBlocks * kChannelTwoShot);
  EXPECT_EQ(reinterpret_cast<unsigned char*>(h.flags(0, kChannelTiles)),
            buffers[0] + h.layout.flags_offset + 4ull * kFlagsPerChannel * kChannelTiles);
  EXPECT_EQ(reinterpret_cast<unsigned char*>(h.tile_seen()),
            buffers[1] + h.layout.counters_offset + 4ull * kNumChannels * kMaxBlocks);
}

TEST(BandGeometry, BandsAndShardsCoverEveryRowOnce) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    for (int tile_m : {64, 128}) {
      for (int64_t m : {1, 3, 64, 127, 128, 1000, 4097, 8192}) {
        const int64_t tiles_m = (m + tile_m - 1) / tile_m;
        BandAllReduceParams p{};
        p.m = m;
        p.n = 264;
        p.tile_m = tile_m;
        p.band_rows = int64_t(band_tile_rows(tiles_m, world)) * tile_m;
        p.comm.world = world;
        ASSERT_LE(band_count(p), kMaxBands);
        int64_t next_row = 0;
        for (int64_t band = 0; band < band_count(p); ++band) {
          const RowRange b = band_rows_of(p, band);
          EXPECT_EQ(b.row0, next_row) << "m " << m << " band " << band;
          EXPECT_GT(b.rows, 0);
          EXPECT_EQ(b.row0 % tile_m, 0);  // bands start on tile rows
          int64_t shard_row = b.row0;
          for (int owner = 0; owner < world; ++owner) {
            const RowRange s = band_shard(p, band, owner);
            EXPECT_EQ(s.row0, shard_row) << "m " << m << " band " << band << " owner " << owner;
            EXPECT_GE(s.rows, 0);
            shard_row += s.rows;
          }
          EXPECT_EQ(shard_row, b.row0 + b.rows);
          next_row = b.row0 + b.rows;
        }
        EXPECT_EQ(next_row, m);
      }
    }
  }
}

TEST(BandGeometry, ASeparateLastBandHoldsItsRowsAndTheOthersCoverTheRest) {
  for (int world : {2, 4})
    for (int64_t m : {129, 1000, 4097, 8192})
      for (int64_t last_tile_rows : {1, 2, 3}) {
        const int tile_m = 128;
        const int64_t tiles_m = (m + tile_m - 1) / tile_m;
        if (last_tile_rows >= tiles_m) continue;
        BandAllReduceParams p{};
        p.m = m;
        p.n = 264;
        p.tile_m = tile_m;
        p.band_rows = 8 * tile_m;
        p.last_band_row0 = (tiles_m - last_tile_rows) * tile_m;
        p.comm.world = world;
        const int64_t bands = band_count(p);
        EXPECT_EQ(bands, (p.last_band_row0 + p.band_rows - 1) / p.band_rows + 1);
        int64_t next_row = 0;
        for (int64_t band = 0; band < bands; ++band) {
          const RowRange b = band_rows_of(p, band);
          EXPECT_EQ(b.row0, next_row) << "m " << m << " band " << band;
          EXPECT_GT(b.rows, 0);
          EXPECT_LE(b.rows, p.band_rows);
          int64_t shard_row = b.row0;
          for (int owner = 0; owner < world; ++owner) shard_row += band_shard(p, band, owner).rows;
          EXPECT_EQ(shard_row, b.row0 + b.rows);
          next_row = b.row0 + b.rows;
        }
        EXPECT_EQ(next_row, m);
        EXPECT_EQ(band_rows_of(p, bands - 1).row0, p.last_band_row0);
      }
}

TEST(BandGeometry, ScatteredShardsAreWholeTileRowsOfTheirOwners) {
  // With scattered tiles the GEMM sends tile row tm to scatter_owner_of_tile_row, and the
  // band kernel of that rank sums (and its peers gather) exactly the shard holding it.
  for (int world = 2; world <= kMaxWorld; ++world) {
    for (int tile_m : {64, 128}) {
      for (int64_t m : {1, 3, 127, 128, 1000, 2048, 4097, 8192}) {
        const int64_t tiles_m = (m + tile_m - 1) / tile_m;
        const int band_rows = scatter_band_tile_rows(tiles_m, world);
        EXPECT_EQ(band_rows % world, 0) << "world " << world << " m " << m;
        BandAllReduceParams p{};
        p.m = m;
        p.n = 264;
        p.tile_m = tile_m;
        p.band_rows = int64_t(band_rows) * tile_m;
        p.comm.world = world;
        p.tiles_scattered = true;
        for (int64_t tm = 0; tm < tiles_m; ++tm) {
          const int owner = scatter_owner_of_tile_row(tm, tiles_m, band_rows, world);
          ASSERT_GE(owner, 0);
          ASSERT_LT(owner, world);
          const RowRange s = band_shard(p, tm * tile_m / p.band_rows, owner);
          EXPECT_EQ(s.row0 % tile_m, 0);
          EXPECT_LE(s.row0, tm * tile_m) << "world " << world << " m " << m << " tm " << tm;
          EXPECT_GT(s.row0 + s.rows, tm * tile_m) << "world " << world << " m " << m << " tm " << tm;
        }
        // Full bands give every rank the same number of tile rows.
        if (m >= p.band_rows)
          for (int owner = 0; owner < world; ++owner)
            EXPECT_EQ(band_shard(p, 0, owner).rows, p.band_rows / world);
      }
    }
  }
}

TEST(MatmulAllReduceDispatch, BandScatterOnlyWhereAsked) {
  const GpuClass kH200 = GpuClass::kH200;
  for (int world : {2, 4, 8})
    for (int64_t m : {1, 2048, 8192, 16384})
      for (int64_t k : {1024, 2048, 7168, 14336})
        EXPECT_NE(choose_matmul_all_reduce(m, k, world, kH200), MatmulAllReduceAlgo::kBandScatter);
  // The override: from its M, with the band schedules' K floor.
  const O scatter_from_100 = overrides({{&O::band_scatter_min_m, 100}});
  EXPECT_EQ(choose_matmul_all_reduce(100, 2048, 4, kH200, scatter_from_100), MatmulAllReduceAlgo::kBandScatter);
  EXPECT_NE(choose_matmul_all_reduce(99, 2048, 4, kH200, scatter_from_100), MatmulAllReduceAlgo::kBandScatter);
  EXPECT_NE(choose_matmul_all_reduce(100, 1024, 4, kH200, scatter_from_100), MatmulAllReduceAlgo::kBandScatter);
  EXPECT_EQ(band_reduce_blocks(MatmulAllReduceAlgo::kBandScatter, 4, 8192, 2048),
            band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 8192, 2048));
}

TEST(BandGeometry, SlotsFitTheTileRegion) {
  static unsigned char buffer[64];
  for (int world = 2; world <= kMaxWorld; ++world) {
    BandAllReduceParams p{};
    p.m = 1000;
    p.n = 264;
    p.dtype = DType::kBFloat16;
    p.comm.world = world;
    p.comm.peer_base[world - 1] = buffer;
    p.comm.layout.tiles_offset = 16;
    const uint64_t region = tile_region_bytes_for_output(uint64_t(p.m) * p.n * 2, world);
    // D at 0, then one slot per rank: recv[src] for src != rank, red for src == rank.
    EXPECT_EQ(band_slot_offset(p, 0), p.m * p.n);
    EXPECT_LE(uint64_t(band_slot_offset(p, world - 1) + p.m * p.n) * 2, region);
    EXPECT_EQ(static_cast<unsigned char*>(band_region(p, world - 1, 5)), buffer + 16 + 10);
  }
}

TEST(Check, ThrowsWithFileLineAndValues) {
  try {
    DF_CHECK(1 + 1 == 3, "value was ", 42);
    FAIL() << "DF_CHECK did not throw";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("value was 42"), std::string::npos) << what;
    EXPECT_NE(what.find("test_dispatch.cpp"), std::string::npos) << what;
  }
}


TEST(MatmulAllReduceChoice, PairExchangeAtTwoRanksBelowTheBands) {
  // W = 2: from M = 512 where the band schedule does not run (o_proj M = 512-16383,
  // down_proj M = 512-4095), never at other world sizes, never below M = 512.
  for (int64_t k : {4096, 14336})
    for (int64_t m : {512, 1023, 1024, 2048, 4095})
      EXPECT_EQ(choose_matmul_all_reduce(m, k, 2, GpuClass::kH200), MatmulAllReduceAlgo::kPairExchange);
  for (int64_t m : {4096, 8192, 16383}) {
    EXPECT_EQ(choose_matmul_all_reduce(m, 4096, 2, kH100), MatmulAllReduceAlgo::kPairExchange);
    EXPECT_EQ(choose_matmul_all_reduce(m, 4096, 2, GpuClass::kH200), MatmulAllReduceAlgo::kPairExchange);
  }
  EXPECT_EQ(choose_matmul_all_reduce(16384, 4096, 2, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(4096, 14336, 2, kH100), MatmulAllReduceAlgo::kBandPull);
  EXPECT_EQ(choose_matmul_all_reduce(511, 4096, 2, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(128, 4096, 2, kH100), MatmulAllReduceAlgo::kSequential);
  for (int world : {3, 4, 8})
    for (int64_t m : {1024, 2048, 3000}) EXPECT_NE(choose_matmul_all_reduce(m, 4096, world, kH100), MatmulAllReduceAlgo::kPairExchange);
  EXPECT_EQ(choose_matmul_all_reduce(100, 64, 2, kH100, overrides({{&O::pair_exchange_min_m, 100}})),
            MatmulAllReduceAlgo::kPairExchange);
  EXPECT_EQ(choose_matmul_all_reduce(100, 64, 4, kH100, overrides({{&O::pair_exchange_min_m, 100}})),
            MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(pair_exchange_min_m(4, 4096), INT64_MAX);
  // H100: down_proj (K_r >= 7168) lost at M = 512 and 768, so from 1024 there; o_proj
  // from 512 as on H200.
  EXPECT_EQ(choose_matmul_all_reduce(1023, 14336, 2, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(1024, 14336, 2, kH100), MatmulAllReduceAlgo::kPairExchange);
  EXPECT_EQ(choose_matmul_all_reduce(512, 4096, 2, kH100), MatmulAllReduceAlgo::kPairExchange);
  EXPECT_EQ(choose_matmul_all_reduce(768, 7167, 2, kH100), MatmulAllReduceAlgo::kPairExchange);
  EXPECT_EQ(choose_matmul_all_reduce(768, 7168, 2, kH100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(pair_exchange_min_m(2, 14336, kH100), 1024);
  EXPECT_EQ(pair_exchange_min_m(2, 4096, kH100), 512);
  EXPECT_EQ(pair_exchange_min_m(2, 14336, GpuClass::kH200), 512);
}

TEST(MatmulAllReduceDispatch, OwnerExchangeForLongKBelowTheBands) {
  const GpuClass kH200 = GpuClass::kH200;
  // At W = 3 with K_r >= 7168 from M = 2048 up to the band schedule's range; at W >= 4
  // the band schedule takes those rows from M = 2048 (band_pull_min_m); never with a
  // shorter K, never at W = 2 (the pair exchange), never below M = 2048.
  for (int world : {2, 4, 8})
    for (int64_t m : {1, 512, 2048, 16384}) EXPECT_NE(choose_matmul_all_reduce(m, 2048, world, kH200), MatmulAllReduceAlgo::kOwnerExchange);
  for (int64_t k : {7168, 14336}) {
    EXPECT_EQ(choose_matmul_all_reduce(2048, k, 3, kH200), MatmulAllReduceAlgo::kOwnerExchange);
    EXPECT_EQ(choose_matmul_all_reduce(band_pull_min_m(3, k, kH200) - 1, k, 3, kH200), MatmulAllReduceAlgo::kOwnerExchange);
    EXPECT_EQ(choose_matmul_all_reduce(band_pull_min_m(3, k, kH200), k, 3, kH200), MatmulAllReduceAlgo::kBandPull);
    for (int world : {3, 4, 8}) EXPECT_NE(choose_matmul_all_reduce(2047, k, world, kH200), MatmulAllReduceAlgo::kOwnerExchange);
    for (int world : {4, 8}) EXPECT_EQ(choose_matmul_all_reduce(2048, k, world, kH200), MatmulAllReduceAlgo::kBandPull);
  }
  EXPECT_NE(choose_matmul_all_reduce(2048, 7160, 3, kH200), MatmulAllReduceAlgo::kOwnerExchange);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 7168, 2, kH200), MatmulAllReduceAlgo::kPairExchange);
  const O owners_from_100 = overrides({{&O::owner_exchange_min_m, 100}});
  EXPECT_EQ(choose_matmul_all_reduce(100, 64, 4, kH200, owners_from_100), MatmulAllReduceAlgo::kOwnerExchange);
  EXPECT_EQ(choose_matmul_all_reduce(99, 64, 4, kH200, owners_from_100), MatmulAllReduceAlgo::kSequential);
  EXPECT_EQ(choose_matmul_all_reduce(2048, 4096, 2, kH200, owners_from_100), MatmulAllReduceAlgo::kPairExchange);
  EXPECT_EQ(choose_matmul_all_reduce(8192, 4096, 4, kH200, owners_from_100), MatmulAllReduceAlgo::kBandPull);
  // 128x128 tiles where 128x256 ones make one wave (M = 512-1023), else by M.
  EXPECT_EQ(exchange_tile_shape(2048, 2), 0);
  EXPECT_EQ(exchange_tile_shape(1024, 2), 0);
  EXPECT_EQ(exchange_tile_shape(511, 2), 0);
  EXPECT_EQ(exchange_tile_shape(512, 2), 4);  // ping-pong at two ranks
  EXPECT_EQ(exchange_tile_shape(1023, 2), 4);
  EXPECT_EQ(exchange_tile_shape(512, 4), 2);
  EXPECT_EQ(exchange_tile_shape(1023, 3), 2);
  EXPECT_EQ(exchange_tile_shape(1024, 4), 0);
  EXPECT_EQ(exchange_tile_shape(512, 2, 3), 3);
  // The band schedules' tiles: by M unless told.
  EXPECT_EQ(band_tile_shape(), 0);
  EXPECT_EQ(band_tile_shape(4), 4);
  // The CTAs: whole waves (as few CTAs as the waves of one per SM need), or as told.
  const struct { int64_t tiles; int ctas; } whole_waves[] = {
      {512, 128}, {256, 128}, {128, 128}, {100, 100}, {133, 67}, {2049, 129}, {1, 1}};
  for (const auto& c : whole_waves) EXPECT_EQ(exchange_ctas(c.tiles, 132), c.ctas) << c.tiles;
  EXPECT_EQ(exchange_ctas(512, 132, 64), 64);
  EXPECT_EQ(exchange_ctas(512, 132, 200), 132);
  for (int64_t tiles = 1; tiles < 3000; tiles += 7) {
    const int ctas = exchange_ctas(tiles, 132);
    EXPECT_GE(ctas, 1);
    EXPECT_LE(ctas, 132);
    EXPECT_EQ((tiles + ctas - 1) / ctas, (tiles + 131) / 132) << tiles;  // no extra wave
  }
  // H100: never (it tied or lost there to the unfused order); the band schedule from M = 2048
  // at W >= 4 (v33), the unfused order below it.
  for (int world : {3, 4, 8}) {
    EXPECT_NE(choose_matmul_all_reduce(2048, 7168, world, GpuClass::kH100), MatmulAllReduceAlgo::kOwnerExchange);
    EXPECT_EQ(choose_matmul_all_reduce(2000, 7168, world, GpuClass::kH100), MatmulAllReduceAlgo::kSequential);
  }
  EXPECT_EQ(owner_exchange_min_m(4, 7168, GpuClass::kH100), INT64_MAX);
}

TEST(MatmulAllReduceDispatch, BandCtasFitTheGemmsWaves) {
  // W = 4 down_proj (K_r = 7168), 32 tiles per tile row, 132 SMs.
  EXPECT_EQ(band_reduce_blocks_for_waves(8, 7168, 4096, 132), 7);  // M = 16384: 34 -> 33 waves
  EXPECT_EQ(band_reduce_blocks_for_waves(8, 7168, 2048, 132), 10);  // M = 8192: 17 waves on 124 to 122
  EXPECT_EQ(band_reduce_blocks_for_waves(8, 7168, 3072, 132), 9);   // M = 12288: 25 waves on 124 to 123
  EXPECT_EQ(band_reduce_blocks_for_waves(8, 7168, 4096, 132, 8), 8);  // an override stands
  // Never where the all-reduce is the bottleneck (o_proj) or below 8 CTAs, never above 10
  // unless the GEMM has 5 waves or fewer.
  EXPECT_EQ(band_reduce_blocks_for_waves(16, 2048, 4064, 132), 16);
  EXPECT_EQ(band_reduce_blocks_for_waves(4, 14336, 4096 + 32, 132), 4);
  EXPECT_EQ(band_reduce_blocks_for_waves(16, 7168, 1024, 132), 16);  // M = 4096: 9 waves
  // 5 waves or fewer: up to a quarter of the SMs while the waves stay (M = 2048: 5 on 103).
  EXPECT_EQ(band_reduce_blocks_for_waves(16, 7168, 512, 132), 29);
  EXPECT_EQ(band_reduce_blocks_for_waves(16, 7168, 256, 132), 33);  // 3 waves on 86 to 116: 33 at most
  EXPECT_EQ(band_reduce_blocks_for_waves(16, 2048, 512, 132), 16);  // o_proj: never
  EXPECT_EQ(band_reduce_blocks_for_waves(8, 7168, 8, 18), 9);  // a small GPU: half its SMs at most
  // Never more waves than at 8 CTAs: one fewer only where that saves one, more only
  // where they cost none, over every tile count.
  for (int64_t tiles = 1; tiles <= 8192; ++tiles) {
    const int blocks = band_reduce_blocks_for_waves(8, 7168, tiles, 132);
    const int most = (tiles + 123) / 124 <= kFewWaves ? 132 / 4 : kWaveFreeBandCtas;
    EXPECT_TRUE(blocks >= 7 && blocks <= most) << tiles;
    const int64_t waves_at_8 = (tiles + 123) / 124, waves = (tiles + 131 - blocks) / (132 - blocks);
    if (blocks == 7) EXPECT_LT(waves, waves_at_8) << tiles;
    else EXPECT_EQ(waves, waves_at_8) << tiles;
    if (blocks > 7 && blocks < most) EXPECT_GT((tiles + 130 - blocks) / (131 - blocks), waves) << tiles;
  }
  // The dispatcher's own CTA count feeds it.
  EXPECT_EQ(band_reduce_blocks(MatmulAllReduceAlgo::kBandPull, 4, 16384, 7168), 8);
}

TEST(MatmulAllReduceDispatch, TheGemmsLastWaveIsABandOfItsOwnWhereTheGemmHidesTheAllReduce) {
  // W = 4 down_proj (K_r = 7168), 32 tiles per tile row, bands of 8 tile rows, 8 band CTAs.
  EXPECT_EQ(last_wave_band_tile_rows(7168, 2048, 124, 32, 8, 4, 8), 2);  // M = 8192: 64 tiles in the 17th wave
  EXPECT_EQ(last_wave_band_tile_rows(7168, 1024, 116, 32, 4, 4, 16), 3);  // M = 4096, bands of 4 rows
  EXPECT_EQ(last_wave_band_tile_rows(14336, 4096, 128, 32, 8, 2, 4), 4);  // W = 2 down_proj M = 16384
  // M = 16384 on 7 band CTAs (the wave rule's count): none at W >= 3.
  EXPECT_EQ(last_wave_band_tile_rows(7168, 4096, 125, 32, 8, 4, 7), 0);
  EXPECT_EQ(last_wave_band_tile_rows(7168, 4096, 125, 32, 8, 4, 7, 1), 3);  // 96 tiles in the 33rd wave
  // None where the last wave fills whole bands, or the all-reduce is the bottleneck.
  EXPECT_EQ(last_wave_band_tile_rows(14336, 2048, 128, 32, 4, 2, 4), 0);
  EXPECT_EQ(last_wave_band_tile_rows(7168, 100, 124, 32, 8, 4, 8), 0);  // one wave, all rows
  EXPECT_EQ(last_wave_band_tile_rows(2048, 2048, 116, 32, 8, 4, 16), 0);
  // Overrides: 1 on at any K, 2 off.
  EXPECT_EQ(last_wave_band_tile_rows(2048, 2048, 116, 32, 8, 4, 16, 1), 3);  // 76 tiles in the 18th wave
  EXPECT_EQ(last_wave_band_tile_rows(7168, 2048, 124, 32, 8, 4, 8, 2), 0);
  // Always fewer rows than a band and than the tile rows, and at least the last wave's.
  for (int64_t tiles_n : {1, 5, 32})
    for (int64_t tiles_m : {1, 2, 9, 64, 128})
      for (int ctas : {1, 7, 124, 132})
        for (int64_t band_rows : {1, 4, 8}) {
          const int64_t tiles = tiles_m * tiles_n;
          const int rows = last_wave_band_tile_rows(7168, tiles, ctas, tiles_n, band_rows, 4, 8);
          EXPECT_GE(rows, 0);
          EXPECT_LT(rows, tiles_m);
          if (rows > 0) {
            EXPECT_LT(rows, band_rows);
            EXPECT_GE(rows * tiles_n, tiles - (tiles - 1) / ctas * ctas);
          }
        }
}

TEST(TileOrder, EveryTileOnceGroupByGroupAndTheLastGroupLast) {
  for (int tiles_m : {1, 2, 9, 10, 64})
    for (int tiles_n : {1, 4, 32})
      for (int group_rows : {1, 4, 8})
        for (int last_group_row0 : {0, 1, 6, 8, 62}) {
          if (last_group_row0 >= tiles_m) continue;
          std::vector<int> seen(tiles_m * tiles_n, 0);
          int previous_group_row0 = 0;
          for (int index = 0; index < tiles_m * tiles_n; ++index) {
            int tm = -1, tn = -1;
            tile_gemm_tile_coord(index, tiles_m, tiles_n, &tm, &tn, group_rows, last_group_row0);
            ASSERT_TRUE(tm >= 0 && tm < tiles_m && tn >= 0 && tn < tiles_n)
                << index << " of " << tiles_m << " x " << tiles_n << ", last group " << last_group_row0;
            ++seen[tm * tiles_n + tn];
            // The last group holds exactly the last tile numbers; groups come in row order.
            if (last_group_row0 > 0) EXPECT_EQ(tm >= last_group_row0, index >= last_group_row0 * tiles_n);
            const int group_row0 = last_group_row0 > 0 && tm >= last_group_row0 ? last_group_row0
                                                                                 : tm / group_rows * group_rows;
            EXPECT_GE(group_row0, previous_group_row0);
            previous_group_row0 = group_row0;
          }
          for (int count : seen) EXPECT_EQ(count, 1);
        }
  // Column by column inside a group: the example of kernels/gemm/tile_gemm.h.
  int tm = -1, tn = -1;
  tile_gemm_tile_coord(9, 10, 4, &tm, &tn, 8);
  EXPECT_EQ(tm, 1);
  EXPECT_EQ(tn, 1);
  tile_gemm_tile_coord(35, 10, 4, &tm, &tn, 8);
  EXPECT_EQ(tm, 9);
  EXPECT_EQ(tn, 1);
  // The same grid with rows 7-9 as the last group: rows 0-6 first, then 7-9.
  tile_gemm_tile_coord(27, 10, 4, &tm, &tn, 8, 7);
  EXPECT_EQ(tm, 6);
  EXPECT_EQ(tn, 3);
  tile_gemm_tile_coord(28, 10, 4, &tm, &tn, 8, 7);
  EXPECT_EQ(tm, 7);
  EXPECT_EQ(tn, 0);
  tile_gemm_tile_coord(32, 10, 4, &tm, &tn, 8, 7);
  EXPECT_EQ(tm, 8);
  EXPECT_EQ(tn, 1);
}

TEST(MatmulAllReduceDispatch, BandGemmTakesWholeTilesUnlessTurnedOff) {
  EXPECT_TRUE(band_gemm_whole_tiles());
  EXPECT_TRUE(band_gemm_whole_tiles(1));
  EXPECT_FALSE(band_gemm_whole_tiles(2));
}

TEST(MatmulAllReduceDispatch, ConsumersTakeTheLastExchangeTileUnlessTurnedOff) {
  EXPECT_TRUE(exchange_last_tile_in_consumers());
  EXPECT_TRUE(exchange_last_tile_in_consumers(1));
  EXPECT_FALSE(exchange_last_tile_in_consumers(2));
}

}  // namespace
}  // namespace distfuse
