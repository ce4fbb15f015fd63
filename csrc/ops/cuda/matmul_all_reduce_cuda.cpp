// CUDA glue of matmul_all_reduce: validate, pick a schedule, launch.
//
// Schedules ("paths"):
//   reference    torch.matmul + NCCL all_reduce (+ bias)
//   sequential   cuBLAS matmul, then the distfuse all-reduce (bias in its epilogue; on the
//                side stream when graph-captured)
//   fused_tiles  tile GEMM on SMs - C SMs, owner-mode tile all-reduce on C SMs, overlapped
//   decode_push  one kernel: skinny GEMM whose epilogue pushes each column block to every
//                peer, then the rank-order sum (small M; kernels/gemm/decode_matmul_all_reduce.h)
//   decode_split_k  one kernel: clusters split K, the tokens stay in shared memory, each
//                column block's rows go to the peers while the next block is computed
//                (M <= 128; kernels/gemm/decode_split_k.h)
//   serialized   the kernels auto would pick, one after the other (tests: same bits, no overlap)
//   chunked      cuBLAS GEMMs of row chunks, each chunk's distfuse all-reduce overlapping the
//                next chunk's GEMM (forced only: never the best measured)
//   copy_engine  tile GEMM on all SMs but a few; each band of finished tile rows is
//                reduce-scattered and all-gathered by the copy engines, summed by a few CTAs
//                (forced only: band_pull beat it wherever it was the default)
//   band_pull    tile GEMM on all SMs but R; each band's shard pulled from every rank and
//                summed by R CTAs, the peers' sums pulled back while the next band is
//                summed (kernels/allreduce/band_all_reduce.h draws both band schedules)
//   pair_exchange  two ranks: one tile GEMM kernel on all SMs whose idle producer warps push
//                each finished tile to the peer and sum the peer's copy in rank order, each
//                CTA's last tile by its consumer warps once their MMAs are done
//                (kernels/gemm/tile_pair_exchange.cuh); forced at W != 2 it runs band_pull
//   owner_exchange  any group size: the same kernel; each tile's owner rank sums what the
//                others pushed and they pull the sum back (kernels/gemm/tile_owner_exchange.cuh)
//   band_scatter band_pull whose GEMM moves every tile into the rank that owns its rows (the
//                reduce-scatter by the GEMM's idle producer warps, or by its epilogue's TMA
//                stores); R CTAs sum the local copies and pull the peers' sums back
//
//   main stream:  ──fork──[ tile GEMM (publishes tile flags) ]──────────join──▶
//   side stream:        └─[ tile all-reduce (consumes flags) ]─────────┘
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distfuse/tuning.h"
#include "kernels/allreduce/band_all_reduce.h"
#include "kernels/allreduce/tile_all_reduce.h"
#include "ops/control.h"
#include "ops/cuda/glue.h"
#include "ops/cuda/side_streams.h"
#include "ops/reference.h"
#include "ops/validate.h"

#ifndef DISTFUSE_NO_GEMM
#include "kernels/gemm/decode_matmul_all_reduce.h"
#include "kernels/gemm/decode_split_k.h"
#include "kernels/gemm/tile_gemm.h"
#endif

namespace distfuse::ops {
namespace {

constexpr const char* kOp = "matmul_all_reduce";

// Σ over the group of `partial` (+ bias once), in place, by the distfuse all-reduce.
void all_reduce_in_place(const comm::Workspace& ws, at::Tensor& partial, const std::optional<at::Tensor>& bias) {
  at::Tensor bias_c;
  if (bias.has_value()) bias_c = contiguous_aligned(*bias);
  bool reference = false;
  DType dtype;
  TORCH_INTERNAL_ASSERT(kernel_dtype(partial.scalar_type(), &dtype));
  const AllReducePath path =
      choose_all_reduce_path(ws, partial.numel() * partial.element_size(), dtype, &reference);
  run_all_reduce(ws, partial, partial, bias.has_value() ? &bias_c : nullptr,
                 reference ? AllReducePath::kTwoShot : path, kOpMatmulAllReduce);
}

// cuBLAS, then the all-reduce. Under graph capture the all-reduce goes to the side
// stream between a fork and a join (sequential_all_reduce_on_side_stream: measured
// faster there); eager calls keep one stream.
//
//   main: ──[cuBLAS GEMM]──fork              join──▶
//   side:                    └─[all-reduce]──┘
at::Tensor sequential(const comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                      const std::optional<at::Tensor>& bias) {
  at::Tensor partial = contiguous_aligned(at::matmul(a, b));  // a temporary: reduced in place
  cudaStream_t main = at::cuda::getCurrentCUDAStream(ws.device());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(main, &capture));
  if (capture != cudaStreamCaptureStatusActive ||
      !sequential_all_reduce_on_side_stream(get_tuning("matmul_all_reduce.sequential_side_stream"))) {
    all_reduce_in_place(ws, partial, bias);
    return partial;
  }
  SideStream& side = side_stream(ws.device());
  side.fork_from(main);
  {
    c10::cuda::CUDAStreamGuard on_side(side.stream);
    all_reduce_in_place(ws, partial, bias);
  }
  side.join_into(main);
  return partial;
}

// out [M, N] viewed with a's leading dimensions: [..., N].
at::Tensor with_leading_dims(const at::Tensor& out, const at::Tensor& a) {
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end() - 1);
  shape.push_back(out.size(1));
  return out.view(shape);
}

// Chunked overlap, built from cuBLAS and the distfuse all-reduce: the GEMM of
// row chunk i+1 runs on the main stream while chunk i is all-reduced in place on
// the side stream by a kernel with few CTAs (the GEMM keeps the rest of the GPU).
//
//   main: ──[mm c0]──[mm c1]──[mm c2]──[mm c3]────────────join──▶
//   side:          └─[AR c0]─└[AR c1]─└[AR c2]─└[AR c3]──┘
//
// Chunks are whole rows (the bias is added by the all-reduce epilogue, column =
// element % N) and start on 16-byte boundaries because N % 8 == 0.
at::Tensor chunked(const comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                   const std::optional<at::Tensor>& bias) {
  const int64_t k = a.size(-1), n = b.size(1);
  const at::Tensor a2 = a.reshape({-1, k});
  const int64_t m = a2.size(0);
  const int64_t rows = chunk_rows(m, ws.world(), get_tuning("matmul_all_reduce.chunks"));
  const int ar_blocks =
      chunk_all_reduce_blocks(ws.world(), static_cast<int>(get_tuning("matmul_all_reduce.chunk_ar_blocks")));
  at::Tensor out = at::empty({m, n}, a.options());
  at::Tensor bias_c;
  if (bias.has_value()) bias_c = contiguous_aligned(*bias);
  DType dtype;
  TORCH_INTERNAL_ASSERT(kernel_dtype(a.scalar_type(), &dtype));

  SideStream& side = side_stream(ws.device());
  cudaStream_t main = at::cuda::getCurrentCUDAStream(ws.device());
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t len = std::min(rows, m - r0);
    at::Tensor out_i = out.narrow(0, r0, len);
    at::mm_out(out_i, a2.narrow(0, r0, len), b);
    // The wait takes the event as recorded now, so one event serves every chunk.
    side.fork_from(main);
    c10::cuda::CUDAStreamGuard on_side(side.stream);
    bool reference = false;
    const AllReducePath path =
        choose_all_reduce_path(ws, out_i.numel() * out_i.element_size(), dtype, &reference);
    run_all_reduce(ws, out_i, out_i, bias.has_value() ? &bias_c : nullptr,
                   reference ? AllReducePath::kTwoShot : path, kOpMatmulAllReduce, ar_blocks);
  }
  side.join_into(main);
  return with_leading_dims(out, a);
}

#ifndef DISTFUSE_NO_GEMM

// A as row-major [M, K] and B as row-major [K, N] or its transpose [N, K]
// (nn.Linear's weight), without copies when the layout already fits.
struct GemmOperands {
  at::Tensor a, b;
  bool b_transposed;
  int64_t m, n, k;
};

GemmOperands gemm_operands(const at::Tensor& a, const at::Tensor& b) {
  GemmOperands g;
  g.k = a.size(-1);
  g.n = b.size(1);
  g.a = contiguous_aligned(a.reshape({-1, g.k}));
  g.m = g.a.size(0);
  if (b.stride(1) == 1 && b.stride(0) == g.n) {
    g.b = b;
    g.b_transposed = false;
  } else if (b.stride(0) == 1 && b.stride(1) == g.k) {
    g.b = b.t();  // [N, K] row-major
    g.b_transposed = true;
  } else {
    g.b = b.contiguous();
    g.b_transposed = false;
  }
  if (reinterpret_cast<uintptr_t>(g.b.data_ptr()) % 16 != 0) g.b = g.b.clone();
  return g;
}

int64_t output_tiles(int64_t m, int64_t n, int tile_m, int tile_n) {
  return (m + tile_m - 1) / tile_m * ((n + tile_n - 1) / tile_n);
}

// Output tiles of the tile GEMM of [M, N] with the tile shape it picks by M.
int64_t output_tiles_by_m(int64_t m, int64_t n) {
  TileGemmParams shape{};
  shape.m = static_cast<int>(m);
  return output_tiles(m, n, tile_gemm_tile_m(shape), tile_gemm_tile_n(shape));
}

// Shapes the tile GEMM and the tile consumers take (others run sequentially).
bool fused_gemm_supported(const at::Tensor& a, const at::Tensor& b) {
  const int64_t k = a.size(-1), n = b.size(1);
  const int64_t m = k ? a.numel() / k : 0;
  if (!((a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf) && k % 8 == 0 &&
        n % 8 == 0 && k > 0 && m > 0 && m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX))
    return false;
  return output_tiles_by_m(m, n) <= tile_all_reduce_max_tiles();
}

// The tile GEMM of A @ B into d (row-major, ld = N), without flags; sm_count is left
// to the caller.
TileGemmParams tile_gemm_params(const GemmOperands& g, at::ScalarType dtype, void* d) {
  TileGemmParams gp{};
  gp.a = g.a.data_ptr();
  gp.b = g.b.data_ptr();
  gp.lda = g.k;
  gp.ldb = g.b.stride(0);
  gp.ldd = g.n;
  gp.m = static_cast<int>(g.m);
  gp.n = static_cast<int>(g.n);
  gp.k = static_cast<int>(g.k);
  gp.b_transposed = g.b_transposed;
  gp.d = d;
  TORCH_INTERNAL_ASSERT(kernel_dtype(dtype, &gp.dtype));
  return gp;
}

// The tile GEMM of A @ B into this rank's tile region of the workspace (grown
// when needed), publishing its tile flags; sm_count is left to the caller.
TileGemmParams tile_gemm_into_workspace(comm::Workspace& ws, const GemmOperands& g, at::ScalarType dtype,
                                        int esize) {
  TileGemmParams gp = tile_gemm_params(g, dtype, nullptr);
  TORCH_INTERNAL_ASSERT(output_tiles(g.m, g.n, tile_gemm_tile_m(gp), tile_gemm_tile_n(gp)) <=
                        tile_all_reduce_max_tiles());
  ws.ensure_tile_bytes(tile_region_bytes(gp.m, gp.n, esize, ws.world()), kOp);
  gp.d = tile_partial(ws.handle());
  gp.tile_flags = tile_ready_flags(ws.handle());
  return gp;
}

// The output of a fused op and its bias, contiguous and 16-byte aligned (null when absent).
struct OutputAndBias {
  at::Tensor out, bias;
  const void* bias_ptr() const { return bias.defined() ? bias.data_ptr() : nullptr; }
};
OutputAndBias output_and_bias(const GemmOperands& g, const at::Tensor& a, const std::optional<at::Tensor>& bias) {
  OutputAndBias r{at::empty({g.m, g.n}, a.options()), at::Tensor()};
  if (bias.has_value()) r.bias = contiguous_aligned(*bias);
  return r;
}

// A tile shape a knob (exchange_tiles, band_tiles) set: one TileGemmParams::tile_shape knows.
void check_tile_shape_knob(const char* knob, int shape) {
  TORCH_CHECK(shape >= 0 && shape <= kMaxTileShape, "matmul_all_reduce.", knob,
              " must be 0 (by M), 1 (64x128), 2 (128x128), 3 (128x256) or 4 (128x128 ping-pong), got ", shape);
}

// A launch of `schedule` for operands `g`: its status, or an error naming both.
void check_launch(cudaError_t status, const char* schedule, const char* launch, const GemmOperands& g) {
  if (status != cudaSuccess)
    fail_launch(kOp, schedule, launch, c10::str("M=", g.m, ", N=", g.n, ", K=", g.k), cudaGetErrorString(status));
}

// kSerialized: every step on the main stream after the whole GEMM (same kernels,
// same bits, no overlap).
enum class Overlap { kOverlapped, kSerialized };

// What both band schedules set up: the tile GEMM into the workspace in bands of
// whole tile-row groups, on all SMs but `reducers` + `spare_sms`, and the band
// all-reduce parameters.
struct BandCall {
  GemmOperands operands;  // holds the copies gemm's pointers may point into until the launch
  TileGemmParams gemm;
  BandAllReduceParams bands;
  OutputAndBias ob;
  void* scratch;
  int reducers;
};

BandCall band_call(comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                   const std::optional<at::Tensor>& bias, MatmulAllReduceAlgo algo, int spare_sms) {
  BandCall bc{};
  bc.operands = gemm_operands(a, b);
  const GemmOperands& g = bc.operands;
  TileGemmParams& gp = bc.gemm;
  gp = tile_gemm_into_workspace(ws, g, a.scalar_type(), static_cast<int>(a.element_size()));
  gp.tile_shape = band_tile_shape(get_tuning("matmul_all_reduce.band_tiles"));
  check_tile_shape_knob("band_tiles", gp.tile_shape);
  // Where that tile shape's flags do not fit (or the epilogue makes the owner scatter's
  // stores, which the ping-pong tiles do not), the tiles by M, which fused_gemm_supported counted.
  const bool scatter_by_warps = band_scatter_by_exchange_warps(get_tuning("matmul_all_reduce.band_scatter_by_warps"));
  const bool scatter_by_epilogue = algo == MatmulAllReduceAlgo::kBandScatter && !scatter_by_warps;
  const int64_t shape_tiles = output_tiles(g.m, g.n, tile_gemm_tile_m(gp), tile_gemm_tile_n(gp));
  if (shape_tiles > tile_all_reduce_max_tiles() ||
      (algo == MatmulAllReduceAlgo::kBandScatter && ws.world() * shape_tiles > kMaxTiles) ||
      (gp.tile_shape == 4 && scatter_by_epilogue))
    gp.tile_shape = 0;
  const int tile_m = tile_gemm_tile_m(gp);
  const int64_t tiles_m = (g.m + tile_m - 1) / tile_m;
  const int64_t bands_knob = get_tuning("matmul_all_reduce.bands");
  gp.group_rows = algo == MatmulAllReduceAlgo::kBandScatter ? scatter_band_tile_rows(tiles_m, ws.world(), bands_knob)
                                                           : band_tile_rows(tiles_m, ws.world(), bands_knob);
  const int64_t tiles = output_tiles(g.m, g.n, tile_m, tile_gemm_tile_n(gp));
  const int blocks_knob = static_cast<int>(get_tuning("matmul_all_reduce.band_reduce_blocks"));
  const int sms = ws.sm_count() - spare_sms;  // the GEMM's and the band kernel's
  bc.reducers = std::max(1, std::min(band_reduce_blocks(algo, ws.world(), g.m, g.k, blocks_knob), ws.sm_count() / 2));
  bc.reducers = band_reduce_blocks_for_waves(bc.reducers, g.k, tiles, sms, blocks_knob);
  gp.sm_count = sms - bc.reducers;
  gp.whole_tiles = band_gemm_whole_tiles(get_tuning("matmul_all_reduce.band_whole_tiles"));

  bc.ob = output_and_bias(g, a, bias);
  BandAllReduceParams& bp = bc.bands;
  bp.output = bc.ob.out.data_ptr();
  bp.bias = bc.ob.bias_ptr();
  bp.m = g.m;
  bp.n = g.n;
  bp.tile_m = tile_m;
  bp.tile_n = tile_gemm_tile_n(gp);
  bp.band_rows = int64_t(gp.group_rows) * tile_m;
  while (band_count(bp) > kMaxBands) bp.band_rows *= 2;  // keeps whole groups per band
  if (algo == MatmulAllReduceAlgo::kBandPull) {
    // The GEMM's last wave as the last band and the last group of the tile order.
    const int last_rows =
        last_wave_band_tile_rows(g.k, tiles, gp.sm_count, (g.n + bp.tile_n - 1) / bp.tile_n, bp.band_rows / tile_m,
                                 ws.world(), bc.reducers, get_tuning("matmul_all_reduce.band_last_wave"));
    if (last_rows > 0 && band_count(bp) < kMaxBands) {  // one band more
      gp.last_group_row0 = static_cast<int>(tiles_m - last_rows);
      bp.last_band_row0 = int64_t(gp.last_group_row0) * tile_m;
    }
  }
  bp.dtype = gp.dtype;
  bp.comm = ws.handle();

  if (algo == MatmulAllReduceAlgo::kBandScatter) {
    // Tile t of rank src lands on the owner at recv[src] (its own at D), flagged at slot src·T + t.
    const CommHandle& c = bp.comm;
    bp.tiles_scattered = true;
    gp.tile_flags = nullptr;
    gp.scatter_world = c.world;
    gp.scatter_band_tile_rows = static_cast<int>(bp.band_rows / tile_m);
    for (int p = 0; p < c.world; ++p) {
      gp.scatter_d[p] = band_region(bp, p, scattered_partial_offset(bp, c.rank, p));
      gp.scatter_flags[p] = c.flags(p, kChannelTiles) + c.rank * tiles;
    }
    gp.scatter_by_exchange_warps = scatter_by_warps;
    gp.comm = c;
  }
  const size_t scratch_bytes = tile_gemm_workspace_bytes(gp);
  bc.scratch = scratch_bytes ? ws.gemm_scratch(scratch_bytes, kOp) : nullptr;
  return bc;
}

// Whether the owner scatter's flags fit: a tile slot per rank and tile (seen counters,
// and as many tile flags).
static_assert(kMaxTiles <= int64_t(kFlagsPerChannel), "a seen counter per tile flag");
bool band_scatter_fits(const at::Tensor& a, const at::Tensor& b, int world) {
  const int64_t k = a.size(-1);
  return world * output_tiles_by_m(a.numel() / k, b.size(1)) <= kMaxTiles;
}

// SM-pull band schedule (kernels/allreduce/band_all_reduce.h): one persistent kernel
// of R CTAs (or one kernel of R CTAs per band) on a side stream, beside the tile GEMM
// on the other SMs; the last T bands (if any) in a second persistent kernel after the
// GEMM, or (K_r < 7168: band_tail_two_shot) the two-shot all-reduce of their rows of D on
// the SMs the GEMM frees.
//
//   main: ─fork─[ tile GEMM on SMs - R ................................ ][bands B-T.. (R' CTAs)]─join─▶
//   side:       [Σ b0][Σ b1, gather b0][Σ b2, gather b1] ... [gather b(B-T-1)]─────────────────┘
//
//   two-shot tail:
//   main: ─fork─[ tile GEMM on SMs - R ..................... ][two-shot of rows of B-T..][consume]─join─▶
//   side:       [Σ b0][gather b0][Σ b1] ... [gather b(B-T-1)]─────────────────────────────────┘
//
// Owner scatter (`scatter`): the GEMM stores each tile into the rank that owns its rows and
// the band kernel sums local copies; always the persistent kernel, after an entry handshake
// (band_all_reduce.h):
//
//   main: ─[entry]─fork─[ tile GEMM on SMs - R, tiles stored to their owners ... ][tail]─join─▶
//   side:              [Σ b0 (local)][gather b0][Σ b1 (local)][gather b1] ... ────────────┘
at::Tensor band_pull(comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias, Overlap overlap, bool scatter) {
  const BandCall bc = band_call(ws, a, b, bias,
                                scatter ? MatmulAllReduceAlgo::kBandScatter : MatmulAllReduceAlgo::kBandPull,
                                /*spare_sms=*/0);
  const int device = ws.device();
  cudaStream_t main = at::cuda::getCurrentCUDAStream(device);
  SideStream& side = side_stream(device, 0);
  const bool overlapped = overlap == Overlap::kOverlapped;
  const char* schedule = scatter ? "band_scatter" : "band_pull";
  if (scatter) check_launch(launch_band_scatter_entry(bc.bands, main), schedule, "launch_band_scatter_entry", bc.operands);
  if (overlapped) side.fork_from(main);
  // GEMM first: it never waits on anything (see fused()).
  check_launch(launch_tile_gemm(bc.gemm, main, bc.scratch), schedule, "launch_tile_gemm", bc.operands);
  cudaStream_t stream = overlapped ? side.stream.stream() : main;
  const int bands = static_cast<int>(band_count(bc.bands));
  const int sum_ahead = band_sum_ahead(static_cast<int>(get_tuning("matmul_all_reduce.band_sum_ahead")));
  const bool two_shot_tail =
      !scatter && band_tail_two_shot(bc.gemm.k, get_tuning("matmul_all_reduce.band_tail_two_shot"));
  int tail = 0;
  if (scatter || band_pull_persistent(get_tuning("matmul_all_reduce.band_persistent"))) {
    const int64_t tail_knob = get_tuning("matmul_all_reduce.band_tail");
    if (two_shot_tail) {
      tail = band_two_shot_tail_bands(ws.world(), bands, tail_knob);
    } else {
      const int64_t tiles_n = (bc.bands.n + bc.bands.tile_n - 1) / bc.bands.tile_n;
      const int64_t wave_tile_rows = (bc.gemm.sm_count + tiles_n - 1) / tiles_n;
      tail = band_tail_bands(bc.gemm.k, bands, bc.bands.band_rows / bc.bands.tile_m, wave_tile_rows, tail_knob);
    }
    check_launch(launch_band_pull_persistent(bc.bands, bc.reducers, /*lane=*/0, 0, bands - tail, sum_ahead, stream),
                 schedule, "launch_band_pull_persistent", bc.operands);
  } else {
    for (int step = 0; step <= bands; ++step)
      check_launch(launch_band_pull(bc.bands, step, bc.reducers, stream), schedule, "launch_band_pull", bc.operands);
  }
  if (tail > 0 && two_shot_tail) {
    // After the GEMM, beside what lane 0 has left on its R SMs: the tail's rows of this
    // rank's D (whole rows, so the bias columns line up) by the two-shot all-reduce.
    const int64_t row0 = band_rows_of(bc.bands, bands - tail).row0;
    const int64_t numel = (bc.bands.m - row0) * bc.bands.n;
    const at::Tensor partial = at::from_blob(band_region(bc.bands, ws.rank(), row0 * bc.bands.n), {numel},
                                             bc.ob.out.options());
    at::Tensor out_rows = bc.ob.out.view({-1}).narrow(0, row0 * bc.bands.n, numel);
    run_all_reduce(ws, partial, out_rows, bc.ob.bias.defined() ? &bc.ob.bias : nullptr, AllReducePath::kTwoShot,
                   kOpMatmulAllReduce);
    check_launch(launch_band_consume_tiles(bc.bands, bands - tail, bands, main), schedule,
                 "launch_band_consume_tiles", bc.operands);
  } else if (tail > 0) {
    // After the GEMM, beside what lane 0 has left on its R SMs.
    const int blocks = std::min(band_tail_blocks(static_cast<int>(get_tuning("matmul_all_reduce.band_tail_blocks"))),
                                ws.sm_count() - bc.reducers);
    check_launch(launch_band_pull_persistent(bc.bands, blocks, /*lane=*/1, bands - tail, bands, sum_ahead, main),
                 schedule, "launch_band_pull_persistent", bc.operands);
  }
  if (overlapped) side.join_into(main);
  return with_leading_dims(bc.ob.out, a);
}

// Copy-engine band schedule (kernels/allreduce/band_all_reduce.h):
//
//   main: ─fork─[ tile GEMM on SMs - R - 1 ................................ ]─join─▶
//   A:          [wait b0][CE push b0][sig][wait b1][CE push b1][sig] ...     ┘
//   B:                 ▲ b0 ready        [Σ b0 (R CTAs)][wait][CE pull b0] ... ┘
at::Tensor copy_engine(comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                       const std::optional<at::Tensor>& bias, Overlap overlap) {
  const BandCall bc = band_call(ws, a, b, bias, MatmulAllReduceAlgo::kCopyEngine, /*spare_sms=*/1);  // one SM for the waits and signals
  const BandAllReduceParams& bp = bc.bands;
  constexpr const char* kSchedule = "copy_engine";
  const int device = ws.device();
  cudaStream_t main = at::cuda::getCurrentCUDAStream(device);
  SideStream& rs = side_stream(device, 0);  // reduce-scatter pushes
  SideStream& ag = side_stream(device, 1);  // sums and all-gather pulls
  const bool overlapped = overlap == Overlap::kOverlapped;
  cudaStream_t rs_stream = overlapped ? rs.stream.stream() : main;
  cudaStream_t ag_stream = overlapped ? ag.stream.stream() : main;
  if (overlapped) {
    rs.fork_from(main);
    ag.fork_from(main);
  }
  // GEMM first: it never waits on anything (see fused()).
  check_launch(launch_tile_gemm(bc.gemm, main, bc.scratch), kSchedule, "launch_tile_gemm", bc.operands);
  const int bands = static_cast<int>(band_count(bp));
  for (int band = 0; band < bands; ++band) {
    check_launch(launch_band_wait_ready(bp, band, rs_stream), kSchedule, "launch_band_wait_ready", bc.operands);
    // The sum of the band reads this rank's D: the wait above is its dependency.
    if (overlapped) ag.fork_from(rs_stream);
    check_launch(band_push_partials(bp, band, rs_stream), kSchedule, "band_push_partials", bc.operands);
    check_launch(launch_band_signal_landed(bp, band, rs_stream), kSchedule, "launch_band_signal_landed", bc.operands);
    check_launch(launch_band_reduce(bp, band, bc.reducers, ag_stream), kSchedule, "launch_band_reduce", bc.operands);
    check_launch(launch_band_wait_reduced(bp, band, ag_stream), kSchedule, "launch_band_wait_reduced", bc.operands);
    check_launch(band_pull_sums(bp, band, ag_stream), kSchedule, "band_pull_sums", bc.operands);
  }
  if (overlapped) {
    rs.join_into(main);
    ag.join_into(main);
  }
  return with_leading_dims(bc.ob.out, a);
}

at::Tensor fused(comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                 const std::optional<at::Tensor>& bias, Overlap overlap, int consumers) {
  GemmOperands g = gemm_operands(a, b);
  const int device = ws.device();
  TileGemmParams gp = tile_gemm_into_workspace(ws, g, a.scalar_type(), static_cast<int>(a.element_size()));
  const int tile_m = tile_gemm_tile_m(gp), tile_n = tile_gemm_tile_n(gp);
  const CommHandle& handle = ws.handle();
  consumers = std::max(1, std::min<int>(consumers, ws.sm_count() / 2));
  gp.sm_count = ws.sm_count() - consumers;

  const OutputAndBias ob = output_and_bias(g, a, bias);
  TileAllReduceParams rp{};
  rp.output = ob.out.data_ptr();
  rp.bias = ob.bias_ptr();
  rp.m = gp.m;
  rp.n = gp.n;
  rp.tile_m = tile_m;
  rp.tile_n = tile_n;
  rp.dtype = gp.dtype;
  rp.group = owner_group_tiles(ws.world(), g.k, static_cast<int>(get_tuning("matmul_all_reduce.group_tiles")));
  rp.comm = handle;

  const size_t scratch_bytes = tile_gemm_workspace_bytes(gp);
  void* scratch = scratch_bytes ? ws.gemm_scratch(scratch_bytes, kOp) : nullptr;

  cudaStream_t main = at::cuda::getCurrentCUDAStream(device);
  if (overlap == Overlap::kSerialized) {
    check_launch(launch_tile_gemm(gp, main, scratch), "fused_tiles", "launch_tile_gemm", g);
    check_launch(launch_tile_all_reduce(rp, consumers, main), "fused_tiles", "launch_tile_all_reduce", g);
  } else {
    SideStream& side = side_stream(device);
    side.fork_from(main);
    // GEMM first: it never waits on anything. A first launch loads its kernel
    // module (lazy loading), which can synchronize the context; done while spinning
    // consumers already run, that waits for them while they wait for the GEMM.
    check_launch(launch_tile_gemm(gp, main, scratch), "fused_tiles", "launch_tile_gemm", g);
    check_launch(launch_tile_all_reduce(rp, consumers, side.stream), "fused_tiles", "launch_tile_all_reduce", g);
    side.join_into(main);
  }
  return with_leading_dims(ob.out, a);
}

// Tile exchange: one tile GEMM kernel on the main stream that also writes the
// rank-order sum, by the pair exchange (two ranks) or through tile owners (any
// group size). Serialized: the same GEMM into the output, then the distfuse
// all-reduce (the same rank-order fp32 sum, rounded once).
at::Tensor tile_exchange(comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& bias, Overlap overlap, bool through_owners) {
  TORCH_INTERNAL_ASSERT(through_owners || ws.world() == 2);
  const GemmOperands g = gemm_operands(a, b);
  const int device = ws.device();
  const OutputAndBias ob = output_and_bias(g, a, bias);
  const bool serialized = overlap == Overlap::kSerialized;
  TileGemmParams gp = serialized ? tile_gemm_params(g, a.scalar_type(), ob.out.data_ptr())
                                 : tile_gemm_into_workspace(ws, g, a.scalar_type(), static_cast<int>(a.element_size()));
  gp.tile_flags = nullptr;
  gp.tile_shape = exchange_tile_shape(g.m, ws.world(), static_cast<int>(get_tuning("matmul_all_reduce.exchange_tiles")));
  check_tile_shape_knob("exchange_tiles", gp.tile_shape);
  const int64_t tiles = output_tiles(g.m, g.n, tile_gemm_tile_m(gp), tile_gemm_tile_n(gp));
  gp.sm_count = exchange_ctas(tiles, ws.sm_count(), static_cast<int>(get_tuning("matmul_all_reduce.exchange_ctas")));
  gp.whole_tiles = true;  // the exchange's plan, also when serialized (same bits)
  TORCH_CHECK(tiles <= tile_all_reduce_max_tiles(),
              "matmul_all_reduce: the tile exchange's ", tiles, " tiles exceed the flag region's ",
              tile_all_reduce_max_tiles(), " (exchange_tiles=", gp.tile_shape, ", M=", g.m, ", N=", g.n, ")");
  if (!serialized) {
    gp.exchange_output = ob.out.data_ptr();
    gp.exchange_bias = ob.bias_ptr();
    gp.exchange_through_owners = through_owners;
    gp.exchange_last_tile_in_consumers =
        !through_owners &&
        exchange_last_tile_in_consumers(get_tuning("matmul_all_reduce.exchange_consumer_tail"));
    gp.comm = ws.handle();
  }
  check_launch(launch_tile_gemm(gp, at::cuda::getCurrentCUDAStream(device)),
               through_owners ? "owner_exchange" : "pair_exchange", "launch_tile_gemm", g);
  at::Tensor out = ob.out;
  if (serialized) all_reduce_in_place(ws, out, bias);
  return with_leading_dims(out, a);
}

// Decode schedules: one kernel on the main stream (kernels/gemm/decode_matmul_all_reduce.h,
// or with split_k kernels/gemm/decode_split_k.h). Serialized: the same kernel writes this
// rank's partial, then the distfuse all-reduce.
at::Tensor decode(comm::Workspace& ws, const at::Tensor& a, const at::Tensor& b,
                  const std::optional<at::Tensor>& bias, Overlap overlap, bool split_k) {
  GemmOperands g = gemm_operands(a, b);
  if (split_k && !g.b_transposed) {  // the split-K kernel reads the weights as [N, K] rows
    g.b = g.b.t().contiguous();
    g.b_transposed = true;
  }
  const int esize = static_cast<int>(a.element_size());
  ws.ensure_tile_bytes(tile_region_bytes(static_cast<int>(g.m), static_cast<int>(g.n), esize, ws.world()), kOp);
  OutputAndBias ob = output_and_bias(g, a, bias);
  DecodeMatmulAllReduceParams p{};
  p.a = g.a.data_ptr();
  p.b = g.b.data_ptr();
  p.output = ob.out.data_ptr();
  p.bias = ob.bias_ptr();
  p.lda = g.k;
  p.ldb = g.b.stride(0);
  p.m = static_cast<int>(g.m);
  p.n = static_cast<int>(g.n);
  p.k = static_cast<int>(g.k);
  p.b_transposed = g.b_transposed;
  TORCH_INTERNAL_ASSERT(kernel_dtype(a.scalar_type(), &p.dtype));
  p.all_reduce = overlap == Overlap::kOverlapped;
  const int64_t push_lines = get_tuning("matmul_all_reduce.decode_ll");
  p.ll128 = decode_ll128(ws.world(), g.m, ws.ll128() && decode_ll128_fits(g.m, g.n), push_lines);
  p.ll = !p.ll128 && decode_ll(ws.world(), g.m, g.m * g.n * esize, kDecodeLLCapacityBytes, push_lines);
  const int ctas = decode_ctas(static_cast<int>(get_tuning("matmul_all_reduce.decode_ctas")));
  p.sm_count = ctas > 0 ? std::min(ctas, ws.sm_count()) : ws.sm_count();
  p.op = kOpMatmulAllReduce;
  p.comm = ws.handle();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(ws.device());
  if (split_k)
    check_launch(launch_decode_split_k_matmul_all_reduce(p, stream), "decode_split_k",
                 "launch_decode_split_k_matmul_all_reduce", g);
  else
    check_launch(launch_decode_matmul_all_reduce(p, stream), "decode_push", "launch_decode_matmul_all_reduce", g);
  if (!p.all_reduce) all_reduce_in_place(ws, ob.out, bias);
  return with_leading_dims(ob.out, a);
}

// The schedule table's entries overridden by distfuse.tuning (0: the table's value).
MatmulAllReduceOverrides table_overrides() {
  MatmulAllReduceOverrides o;
  o.fused_min_m = get_tuning("matmul_all_reduce.fused_min_m");
  o.band_pull_min_m = get_tuning("matmul_all_reduce.band_pull_min_m");
  o.band_pull_min_k = get_tuning("matmul_all_reduce.band_pull_min_k");
  o.decode_min_m = get_tuning("matmul_all_reduce.decode_min_m");
  o.decode_max_m = get_tuning("matmul_all_reduce.decode_max_m");
  o.decode_split_k_max_m = get_tuning("matmul_all_reduce.decode_split_k_max_m");
  o.pair_exchange_min_m = get_tuning("matmul_all_reduce.pair_exchange_min_m");
  o.owner_exchange_min_m = get_tuning("matmul_all_reduce.owner_exchange_min_m");
  o.band_scatter_min_m = get_tuning("matmul_all_reduce.band_scatter_min_m");
  return o;
}

// The tile exchanges count tiles with their own shape (exchange_tile_shape: 128 x 128
// at M = 512-1023, twice the tiles fused_gemm_supported counted by M), each with a flag
// in the tile region: where they exceed it, the dispatch falls back to the band schedule.
// A bad exchange_tiles override is left to tile_exchange, which names it.
bool tile_exchange_fits(const at::Tensor& a, const at::Tensor& b, int world) {
  const int64_t k = a.size(-1);
  TileGemmParams shape{};
  shape.m = static_cast<int>(a.numel() / k);
  shape.tile_shape = exchange_tile_shape(shape.m, world, static_cast<int>(get_tuning("matmul_all_reduce.exchange_tiles")));
  if (shape.tile_shape < 0 || shape.tile_shape > kMaxTileShape) return true;
  return output_tiles(shape.m, b.size(1), tile_gemm_tile_m(shape), tile_gemm_tile_n(shape)) <=
         tile_all_reduce_max_tiles();
}

// The owner schedule of fused_tiles needs an output tile per rank.
bool owner_schedule_fits(const at::Tensor& a, const at::Tensor& b, int world) {
  const int64_t k = a.size(-1);
  return output_tiles_by_m(a.numel() / k, b.size(1)) >= world;
}

#endif  // DISTFUSE_NO_GEMM

at::Tensor matmul_all_reduce_cuda(const at::Tensor& a, const at::Tensor& b,
                                  c10::string_view group_name,
                                  const std::optional<at::Tensor>& bias) {
  check_matmul(kOp, a, b, bias);
  c10::cuda::CUDAGuard guard(a.device());
  comm::Workspace& ws = comm::Workspace::get(std::string(group_name), kOp);
  if (ws.world() == 1) {
    record_path(kOp, "local");
    at::Tensor y = at::matmul(a, b);
    return bias.has_value() ? y.add_(*bias) : y;
  }
  DType dtype;
  const std::string forced = forced_path(kOp);
  if (!ws.p2p() || !kernel_dtype(a.scalar_type(), &dtype) || forced == "reference" ||
      a.numel() == 0) {
    record_path(kOp, "reference");
    return matmul_all_reduce_reference(a, b, group_name, bias);
  }
  check_workspace_device(kOp, "a", a, ws);
  check_workspace_device(kOp, "b", b, ws);
  if (bias.has_value()) check_workspace_device(kOp, "bias", *bias, ws);

  if (forced == "chunked" && b.size(1) % 8 == 0) {
    record_path(kOp, "chunked");
    return chunked(ws, a, b, bias);
  }
#ifndef DISTFUSE_NO_GEMM
  if (forced != "sequential" && forced != "chunked" && fused_gemm_supported(a, b)) {
    const int64_t k = a.size(-1), m = a.numel() / k;
    MatmulAllReduceAlgo algo = choose_matmul_all_reduce(m, k, ws.world(), gpu_class(ws.gpu_name()), table_overrides());
    if (forced == "fused_tiles") algo = MatmulAllReduceAlgo::kFusedTiles;
    if (forced == "decode_push") algo = MatmulAllReduceAlgo::kDecodePush;
    if (forced == "decode_split_k") algo = MatmulAllReduceAlgo::kDecodeSplitK;
    if (forced == "copy_engine") algo = MatmulAllReduceAlgo::kCopyEngine;
    if (forced == "band_pull") algo = MatmulAllReduceAlgo::kBandPull;
    if (forced == "pair_exchange")
      algo = ws.world() == 2 ? MatmulAllReduceAlgo::kPairExchange : MatmulAllReduceAlgo::kBandPull;
    if (forced == "owner_exchange") algo = MatmulAllReduceAlgo::kOwnerExchange;
    if (forced == "band_scatter") algo = MatmulAllReduceAlgo::kBandScatter;
    // Too many tiles for a flag slot per rank and tile: the same bands, pulled.
    if (algo == MatmulAllReduceAlgo::kBandScatter && !band_scatter_fits(a, b, ws.world()))
      algo = MatmulAllReduceAlgo::kBandPull;
    // Too many exchange tiles for the flag region: the band schedule, whose tiles fit.
    if ((algo == MatmulAllReduceAlgo::kPairExchange || algo == MatmulAllReduceAlgo::kOwnerExchange) &&
        !tile_exchange_fits(a, b, ws.world()))
      algo = MatmulAllReduceAlgo::kBandPull;
    // "serialized" runs the schedule auto would pick, without the overlap.
    const bool serialized = forced == "serialized";
    const Overlap overlap = serialized ? Overlap::kSerialized : Overlap::kOverlapped;
    if (algo == MatmulAllReduceAlgo::kPairExchange || algo == MatmulAllReduceAlgo::kOwnerExchange) {
      const bool owners = algo == MatmulAllReduceAlgo::kOwnerExchange;
      at::Tensor out = tile_exchange(ws, a, b, bias, overlap, owners);
      record_path(kOp, serialized ? "serialized" : owners ? "owner_exchange" : "pair_exchange");
      return out;
    }
    if (algo == MatmulAllReduceAlgo::kBandPull || algo == MatmulAllReduceAlgo::kBandScatter) {
      const bool scatter = algo == MatmulAllReduceAlgo::kBandScatter;
      at::Tensor out = band_pull(ws, a, b, bias, overlap, scatter);
      record_path(kOp, serialized ? "serialized" : scatter ? "band_scatter" : "band_pull");
      return out;
    }
    if (algo == MatmulAllReduceAlgo::kCopyEngine) {
      at::Tensor out = copy_engine(ws, a, b, bias, overlap);
      record_path(kOp, serialized ? "serialized" : "copy_engine");
      return out;
    }
    if (algo == MatmulAllReduceAlgo::kFusedTiles && !owner_schedule_fits(a, b, ws.world()))
      algo = MatmulAllReduceAlgo::kDecodePush;  // decode-sized anyway
    // The split-K schedule takes M <= 128 and N in whole 64-column blocks; elsewhere the
    // one-kernel decode schedule. Not the weights' layout, which may differ between ranks:
    // decode() gives the kernel a transposed copy of a row-major [K, N] weight.
    if (algo == MatmulAllReduceAlgo::kDecodeSplitK &&
        !decode_split_k_shape_supported(m, b.size(1), k, /*b_transposed=*/true))
      algo = MatmulAllReduceAlgo::kDecodePush;
    if (algo == MatmulAllReduceAlgo::kDecodeSplitK) {
      at::Tensor out = decode(ws, a, b, bias, overlap, /*split_k=*/true);
      record_path(kOp, serialized ? "serialized" : "decode_split_k");
      return out;
    }
    if (algo == MatmulAllReduceAlgo::kDecodePush &&
        decode_shape_supported(m, b.size(1), k)) {
      at::Tensor out = decode(ws, a, b, bias, overlap, /*split_k=*/false);
      record_path(kOp, serialized ? "serialized" : "decode_push");
      return out;
    }
    if (algo == MatmulAllReduceAlgo::kFusedTiles) {
      const int consumers =
          consumer_blocks(ws.world(), k, static_cast<int>(get_tuning("matmul_all_reduce.consumer_blocks")));
      at::Tensor out = fused(ws, a, b, bias, overlap, consumers);
      record_path(kOp, serialized ? "serialized" : "fused_tiles");
      return out;
    }
    if (serialized) {
      record_path(kOp, "serialized");
      return sequential(ws, a, b, bias);
    }
  }
#endif
  record_path(kOp, "sequential");
  return sequential(ws, a, b, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(distfuse, CUDA, m) { m.impl("matmul_all_reduce", &matmul_all_reduce_cuda); }

}  // namespace distfuse::ops
