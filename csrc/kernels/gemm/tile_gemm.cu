// Host side of the flag-publishing GEMM: configuration choice, tile schedule,
// argument checks and launch. Design notes: tile_gemm.h.

// The asserts inside CUTLASS's mainloop are function calls in device code, and
// a call serializes the wgmma pipeline (ptxas C7510): build this file without
// them whatever the build flags say.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "tile_gemm.h"

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/half.h>

#include "kernels/common/launch.cuh"
#include "tile_gemm_kernel.cuh"

namespace distfuse {
namespace tile_gemm_detail {
namespace {

using cute::_1;

constexpr int kAlignment = 8;  // elements: TMA needs 16-byte aligned rows
constexpr int kTileK = 64;
// Up to this M the decode configuration is used.
constexpr int kDecodeMaxM = 128;
// A plan whose whole waves keep at least this share of the CTAs busy stays
// data-parallel (no split tiles, no workspace).
constexpr double kMinWaveEfficiency = 0.9;
// A stream-K range shorter than this many K blocks costs more in partial-sum
// traffic than it saves.
constexpr int kMinBlocksPerRange = 4;
// A plan has fewer than 2 * sm_count split tiles, so with sm_count bounded the
// split-tile counters fit one fixed region at the start of the workspace: no
// plan writes partial sums where another plan keeps counters, and one
// zero-filled workspace serves launches of every shape.
constexpr int kMaxCtas = 1024;
constexpr size_t kSplitCounterBytes = 2 * kMaxCtas * sizeof(uint32_t);

enum class Variant { kDecode, kMid, kPrefill, kMidPingpong };

// A tile configuration: tile shape, the pipeline stages the shared memory must
// hold, and the schedules that select the builder's TiledMma and epilogue (the
// kernel is ours).
template <int kTileM_, int kTileN_, int kStages_, class MainloopSchedule_, class EpilogueSchedule_,
          int kConsumerGroups_ = 1>
struct TileConfig {
  static constexpr int kStages = kStages_;
  static constexpr int kConsumerGroups = kConsumerGroups_;  // 2: ping-pong (TileGemmKernel)
  static constexpr int kTileM = kTileM_;
  static constexpr int kTileN = kTileN_;
  using Tile = cute::Shape<cute::Int<kTileM>, cute::Int<kTileN>, cute::Int<kTileK>>;
  using MainloopSchedule = MainloopSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
};

// 1 consumer warp group (the builder's 1-warp-group TiledMma).
using DecodeShape = TileConfig<64, 128, 8, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                               cutlass::epilogue::TmaWarpSpecialized>;
// Half the prefill tile's columns: twice the tiles, so a tile exchange has a shorter
// last wave (only when TileGemmParams::tile_shape asks for it).
using MidShape = TileConfig<128, 128, 6, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative>;
// The mid tile with a warp group per tile (the builder's 1-warp-group TiledMma), two
// consumer groups taking turns: each epilogue runs under the other group's MMAs.
using MidPingpongShape = TileConfig<128, 128, 6, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                    cutlass::epilogue::TmaWarpSpecialized, 2>;
// The builder's TiledMma of 2 warp groups splitting the tile's 128 rows.
using PrefillShape = TileConfig<128, 256, 4, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                cutlass::epilogue::TmaWarpSpecializedCooperative>;

template <class Element_, bool kBTransposed, class ShapeConfig>
struct Config {
  using Element = Element_;
  using Tile = typename ShapeConfig::Tile;
  using Cluster = cute::Shape<_1, _1, _1>;
  // B given as Bt [N, K] row-major is column-major [K, N]: K-major for wgmma.
  using LayoutB = std::conditional_t<kBTransposed, cutlass::layout::ColumnMajor,
                                     cutlass::layout::RowMajor>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignment,        // no source operand C
      Element, cutlass::layout::RowMajor, kAlignment,     // D
      typename ShapeConfig::EpilogueSchedule>::CollectiveOp;

  // The kernel's shared storage beyond the epilogue's: pipeline barriers,
  // alignment padding, the split-tile broadcast words and the tile exchanges'
  // staging buffer (which fits the space whole pipeline stages leave over: 4
  // stages of 128 x 256 x 64 tiles, 8 of 64 x 128 x 64 ones, 6 of 128 x 128 x 64).
  static constexpr int kKernelSmemBytes = 2048 + kExchangeStagingBytes;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,
      Element, LayoutB, kAlignment, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          int(sizeof(typename Epilogue::SharedStorage)) + kKernelSmemBytes>,
      typename ShapeConfig::MainloopSchedule>::CollectiveOp;

  using Kernel = TileGemmKernel<Mainloop, Epilogue, ShapeConfig::kConsumerGroups>;
  static_assert(Mainloop::DispatchPolicy::Stages >= ShapeConfig::kStages,
                "the kernel's shared storage costs the mainloop a pipeline stage");
  static_assert(sizeof(typename Kernel::SharedStorage) <= 227 * 1024,
                "shared storage exceeds the 227 KB an sm_90 CTA may use");
};

struct Plan {
  Variant variant;
  int tile_m;
  int tile_n;
  TileSchedule schedule;
  size_t workspace_bytes;  // split-tile counters, then 2 partial-sum slots per CTA
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Variant variant_for(const TileGemmParams& p) {
  switch (p.tile_shape) {
    case 1: return Variant::kDecode;
    case 2: return Variant::kMid;
    case 3: return Variant::kPrefill;
    case 4: return Variant::kMidPingpong;
    default: return p.m <= kDecodeMaxM ? Variant::kDecode : Variant::kPrefill;
  }
}

int tile_m_of(Variant v) {
  switch (v) {
    case Variant::kDecode: return DecodeShape::kTileM;
    case Variant::kMid: return MidShape::kTileM;
    case Variant::kMidPingpong: return MidPingpongShape::kTileM;
    default: return PrefillShape::kTileM;
  }
}
int tile_n_of(Variant v) {
  switch (v) {
    case Variant::kDecode: return DecodeShape::kTileN;
    case Variant::kMid: return MidShape::kTileN;
    case Variant::kMidPingpong: return MidPingpongShape::kTileN;
    default: return PrefillShape::kTileN;
  }
}

Plan make_plan(const TileGemmParams& p) {
  Plan plan{};
  plan.variant = variant_for(p);
  plan.tile_m = tile_m_of(plan.variant);
  plan.tile_n = tile_n_of(plan.variant);

  TileSchedule& s = plan.schedule;
  s.tiles_m = int(ceil_div(p.m, plan.tile_m));
  s.tiles_n = int(ceil_div(p.n, plan.tile_n));
  s.group_rows = p.group_rows > 0 ? p.group_rows : kTileGemmGroupRows;
  s.last_group_row0 = p.last_group_row0;
  s.k_tiles = int(ceil_div(p.k, kTileK));
  const int tiles = s.tiles_m * s.tiles_n;
  const int ctas = p.sm_count;

  const int64_t waves = ceil_div(tiles, ctas);
  const double wave_efficiency = double(tiles) / double(waves * ctas);
  // The tile exchanges need every tile computed whole by a CTA known on every rank; the
  // ping-pong groups take whole tiles in turns.
  const bool whole_tiles = p.whole_tiles || p.exchange_output != nullptr || p.scatter_by_exchange_warps ||
                           plan.variant == Variant::kMidPingpong;
  if (whole_tiles || wave_efficiency >= kMinWaveEfficiency || s.k_tiles < 2 * kMinBlocksPerRange) {
    s.num_ctas = tiles < ctas ? tiles : ctas;
    s.dp_tiles = tiles;
    return plan;
  }
  // Keep all but the last full wave data-parallel; the last full wave and the
  // partial one are spread over all CTAs by K blocks.
  s.dp_tiles = tiles > ctas ? (tiles / ctas - 1) * ctas : 0;
  s.sk_tiles = tiles - s.dp_tiles;
  s.sk_iters = int64_t(s.sk_tiles) * s.k_tiles;
  s.num_ctas = ctas;
  if (s.sk_iters < int64_t(ctas) * kMinBlocksPerRange) {  // only when dp_tiles == 0
    s.num_ctas = int(s.sk_iters / kMinBlocksPerRange);
  }
  plan.workspace_bytes =
      kSplitCounterBytes + size_t(2) * s.num_ctas * plan.tile_m * plan.tile_n * sizeof(float);
  return plan;
}

// Launched as the GEMM's programmatic dependent (the GEMM lets it launch at its start).
__global__ void exchange_timeout_check_kernel(const CommHandle comm) { exchange_timeout_check(comm); }

cudaError_t check_params(const TileGemmParams& p) {
  if (p.a == nullptr || p.b == nullptr || p.d == nullptr || p.m < 1 || p.n < 1 || p.k < 1 ||
      p.sm_count < 1 || p.sm_count > kMaxCtas || p.group_rows < 0 || p.tile_shape < 0 ||
      p.tile_shape > kMaxTileShape || p.lda < p.k || p.ldd < p.n ||
      p.ldb < (p.b_transposed ? p.k : p.n)) {
    return cudaErrorInvalidValue;
  }
  if (p.last_group_row0 < 0 || p.last_group_row0 >= ceil_div(p.m, tile_m_of(variant_for(p))))
    return cudaErrorInvalidValue;
  const int max_world = p.exchange_through_owners ? kMaxWorld : 2;
  if (p.exchange_output != nullptr &&
      (p.comm.world < 2 || p.comm.world > max_world || p.comm.rank < 0 || p.comm.rank >= p.comm.world ||
       p.tile_flags != nullptr || (p.exchange_through_owners && p.exchange_last_tile_in_consumers) ||
       !aligned16(p.exchange_output) || !aligned16(p.exchange_bias) || p.ldd != p.n)) {
    return cudaErrorInvalidValue;
  }
  if (p.scatter_world != 0) {
    // The ping-pong groups publish each tile in their epilogue's turn; the epilogue's
    // owner scatter publishes a tile only after the next one's stores.
    if (variant_for(p) == Variant::kMidPingpong && !p.scatter_by_exchange_warps) return cudaErrorInvalidValue;
    if (p.scatter_world < 2 || p.scatter_world > kMaxWorld || p.scatter_band_tile_rows < 1 ||
        p.exchange_output != nullptr)
      return cudaErrorInvalidValue;
    for (int r = 0; r < p.scatter_world; ++r)
      if (p.scatter_d[r] == nullptr || p.scatter_flags[r] == nullptr || !aligned16(p.scatter_d[r]))
        return cudaErrorInvalidValue;
  }
  // The exchange warps copy whole rows of D (ld = N) and keep this rank's own tiles in D.
  if (p.scatter_by_exchange_warps &&
      (p.scatter_world == 0 || p.comm.rank < 0 || p.comm.rank >= p.scatter_world ||
       p.scatter_d[p.comm.rank] != p.d || p.ldd != p.n))
    return cudaErrorInvalidValue;
  if ((p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) || p.k % kAlignment != 0 ||
      p.n % kAlignment != 0 || p.lda % kAlignment != 0 || p.ldb % kAlignment != 0 ||
      p.ldd % kAlignment != 0 || !aligned16(p.a) || !aligned16(p.b) || !aligned16(p.d)) {
    return cudaErrorNotSupported;
  }
  return cudaSuccess;
}

template <class C>
cudaError_t launch(const TileGemmParams& p, const Plan& plan, void* workspace,
                   cudaStream_t stream) {
  using Element = typename C::Element;
  using Mainloop = typename C::Mainloop;
  using Epilogue = typename C::Epilogue;
  using Kernel = typename C::Kernel;

  const auto problem = cute::make_shape(p.m, p.n, p.k, 1);
  typename Mainloop::StrideB stride_b;
  if constexpr (std::is_same_v<typename C::LayoutB, cutlass::layout::ColumnMajor>) {
    stride_b = cute::make_stride(p.ldb, cute::Int<1>{}, int64_t(p.n) * p.ldb);
  } else {
    stride_b = cute::make_stride(cute::Int<1>{}, p.ldb, int64_t(p.k) * p.ldb);
  }
  const typename Mainloop::Arguments mainloop_args{
      static_cast<const Element*>(p.a),
      cute::make_stride(p.lda, cute::Int<1>{}, int64_t(p.m) * p.lda),
      static_cast<const Element*>(p.b), stride_b};

  // The epilogue's TMA store into `d` (laid out like D).
  auto epilogue_into = [&](const void* d) {
    typename Epilogue::Arguments args{};
    args.thread.alpha = 1.f;
    args.thread.beta = 0.f;
    args.ptr_D = static_cast<const Element*>(d);
    args.dD = cute::make_stride(p.ldd, cute::Int<1>{}, int64_t(p.m) * p.ldd);
    return args;
  };
  TileOwnerScatter scatter{};
  scatter.world = p.scatter_world;
  scatter.rank = p.comm.rank;
  scatter.band_tile_rows = p.scatter_band_tile_rows;
  scatter.by_exchange_warps = p.scatter_by_exchange_warps;
  for (int r = 0; r < p.scatter_world; ++r) {
    scatter.owner_d[r] = p.scatter_d[r];
    scatter.owner_flags[r] = p.scatter_flags[r];
  }
  const bool tma_scatter = scatter.by_epilogue();
  const void* d = tma_scatter ? p.scatter_d[0] : p.d;
  if (!Mainloop::can_implement(problem, mainloop_args) ||
      !Epilogue::can_implement(problem, epilogue_into(d))) {
    return cudaErrorNotSupported;
  }

  auto* workspace_bytes = static_cast<unsigned char*>(workspace);
  typename Kernel::Params params{};
  params.mainloop = Mainloop::to_underlying_arguments(problem, mainloop_args, nullptr);
  params.epilogue[0] = Epilogue::to_underlying_arguments(problem, epilogue_into(d), nullptr);
  for (int r = 1; r < kMaxWorld; ++r)
    params.epilogue[r] = tma_scatter && r < p.scatter_world
                             ? Epilogue::to_underlying_arguments(problem, epilogue_into(p.scatter_d[r]), nullptr)
                             : params.epilogue[0];
  params.problem = problem;
  params.schedule = plan.schedule;
  params.tile_flags = p.tile_flags;
  params.split_counters = reinterpret_cast<uint32_t*>(workspace_bytes);
  params.split_partials = reinterpret_cast<float*>(workspace_bytes + kSplitCounterBytes);
  params.exchange = TileExchange{p.exchange_output, p.exchange_bias, p.comm, p.exchange_through_owners,
                                 p.exchange_last_tile_in_consumers};
  params.scatter = scatter;

  const auto kernel = tile_gemm_kernel<Kernel>;
  constexpr int kSmemBytes = int(sizeof(typename Kernel::SharedStorage));
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<plan.schedule.num_ctas, Kernel::kThreads, kSmemBytes, stream>>>(params);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.exchange_output == nullptr) return err;
  return launch_kernel(exchange_timeout_check_kernel, 1, 1, 0, stream, /*dependent=*/true, p.comm);
}

template <class Element, class ShapeConfig>
cudaError_t launch_for_layout(const TileGemmParams& p, const Plan& plan, void* workspace,
                              cudaStream_t stream) {
  return p.b_transposed
             ? launch<Config<Element, true, ShapeConfig>>(p, plan, workspace, stream)
             : launch<Config<Element, false, ShapeConfig>>(p, plan, workspace, stream);
}

template <class Element>
cudaError_t launch_for_dtype(const TileGemmParams& p, const Plan& plan, void* workspace,
                             cudaStream_t stream) {
  switch (plan.variant) {
    case Variant::kDecode: return launch_for_layout<Element, DecodeShape>(p, plan, workspace, stream);
    case Variant::kMid: return launch_for_layout<Element, MidShape>(p, plan, workspace, stream);
    case Variant::kMidPingpong: return launch_for_layout<Element, MidPingpongShape>(p, plan, workspace, stream);
    default: return launch_for_layout<Element, PrefillShape>(p, plan, workspace, stream);
  }
}

}  // namespace
}  // namespace tile_gemm_detail

int tile_gemm_tile_m(const TileGemmParams& p) {
  return tile_gemm_detail::tile_m_of(tile_gemm_detail::variant_for(p));
}

int tile_gemm_tile_n(const TileGemmParams& p) {
  return tile_gemm_detail::tile_n_of(tile_gemm_detail::variant_for(p));
}

size_t tile_gemm_workspace_bytes(const TileGemmParams& p) {
  if (tile_gemm_detail::check_params(p) != cudaSuccess) return 0;
  return tile_gemm_detail::make_plan(p).workspace_bytes;
}

cudaError_t launch_tile_gemm(const TileGemmParams& p, cudaStream_t stream, void* workspace) {
  using namespace tile_gemm_detail;
  const cudaError_t err = check_params(p);
  if (err != cudaSuccess) return err;
  const Plan plan = make_plan(p);
  if (plan.workspace_bytes > 0 && (workspace == nullptr || !aligned16(workspace))) {
    return cudaErrorInvalidValue;
  }
  return p.dtype == DType::kBFloat16
             ? launch_for_dtype<cutlass::bfloat16_t>(p, plan, workspace, stream)
             : launch_for_dtype<cutlass::half_t>(p, plan, workspace, stream);
}

}  // namespace distfuse
