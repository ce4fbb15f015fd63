// Plain parameter structs of the kernels: raw pointers, sizes and strides only.
// The ATen glue (csrc/ops/) validates tensors and fills them.
#pragma once

#include <cstdint>

#include "distfuse/comm/handle.h"

namespace distfuse {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Names the op in timeout messages of the device code.
enum OpId : int {
  kOpAllReduce = 0,
  kOpMatmulAllReduce = 1,
  kOpAllReduceRmsNorm = 2,
};

#if defined(__CUDACC__)
__host__ __device__
#endif
inline const char* op_name(int op) {
  switch (op) {
    case kOpAllReduce: return "all_reduce";
    case kOpMatmulAllReduce: return "matmul_all_reduce";
    case kOpAllReduceRmsNorm: return "all_reduce_rms_norm";
    default: return "distfuse op";
  }
}

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Whether a pointer the kernels read or write in 16-byte vectors is aligned for them.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Sum of one tensor over the group: output = Σ_r input_r (+ bias[i % bias_period]).
struct AllReduceParams {
  const void* input;  // this rank's contribution; 16-byte aligned
  void* output;       // numel elements; 16-byte aligned; may alias input
  const void* bias;   // optional, `bias_period` elements of the same dtype, added once
  int64_t bias_period;
  int64_t numel;
  DType dtype;
  int op;       // OpId, for timeout messages
  int blocks;   // two-shot: most blocks to use (0: the default)
  int64_t chunk_bytes;  // two-shot: bytes a block moves per peer and step (0: the default)
  bool dependent_launch;  // launch as a programmatic dependent of the previous kernel (PDL)
  int one_shot_lines_per_thread;  // one-shot CTA geometry: 1 or 2 (0: 2)
  CommHandle comm;
};

// The largest TileGemmParams::tile_shape (the list at the field).
constexpr int kMaxTileShape = 4;

// GEMM whose every output tile publishes a readiness flag.
//
//   D[M, N] = A[M, K] @ B[K, N]        (fp32 accumulation, D in A's dtype)
//
// A is row-major with leading dimension lda (>= K). B is either row-major [K, N]
// (b_transposed == false, ldb >= N) or given as its transpose Bt [N, K] row-major
// (b_transposed == true, ldb >= K), which is how nn.Linear stores its weight.
// D is row-major with leading dimension ldd (>= N).
//
// When tile (tm, tn) of D is completely written and visible to other GPUs, the
// kernel atomically adds 1 (release, system scope) to
// tile_flags[tm * tiles_n + tn], where tiles_n = ceil(N / tile_n). The flags are
// never reset: a consumer that has seen c calls expects the value c + 1.
struct TileGemmParams {
  const void* a;
  const void* b;
  void* d;
  int64_t lda, ldb, ldd;
  int m, n, k;
  bool b_transposed;
  DType dtype;            // kBFloat16 or kFloat16
  uint32_t* tile_flags;   // may be null: no flags are published
  int sm_count;           // CTAs of the persistent grid (the SMs this GEMM may occupy)
  int group_rows;         // tile rows per group of the tile order (0: kTileGemmGroupRows)
  int last_group_row0;    // > 0: the tile rows from this one form one last group of the order
  bool whole_tiles;       // every tile computed whole by one CTA (no stream-K), as with the exchange
  int tile_shape;         // output tile: 0 by M (64x128 up to M = 128, else 128x256), 1 64x128,
                          // 2 128x128, 3 128x256, 4 128x128 in ping-pong (whole tiles only):
                          // at most kMaxTileShape
  // Pair exchange (two ranks; kernels/gemm/tile_pair_exchange.cuh): when
  // exchange_output is set, d is this rank's tile partial in `comm`'s workspace,
  // tile_flags is null, and the kernel also writes exchange_output [M, N] (ld = N)
  // = the rank-order sum of both ranks' D (+ exchange_bias [N], added once).
  // exchange_through_owners: the same for any group size, through tile owners
  // (kernels/gemm/tile_owner_exchange.cuh). exchange_last_tile_in_consumers (pair
  // exchange only): each CTA's consumer warp groups exchange its last tile themselves.
  void* exchange_output;
  const void* exchange_bias;
  bool exchange_through_owners;
  bool exchange_last_tile_in_consumers;
  CommHandle comm;
  // Owner scatter (the band_scatter schedule, kernels/allreduce/band_all_reduce.h): when
  // scatter_world > 0 the epilogue stores tile (tm, tn) straight into its owner rank's
  // buffer, scatter_d[owner] (laid out like D, ld = ldd), and publishes its flag at
  // scatter_flags[owner][tm * tiles_n + tn], where the owner is the shard of tile row tm
  // in its band of scatter_band_tile_rows tile rows (scatter_owner_of_tile_row,
  // band_geometry.h). d and tile_flags are then unused. With scatter_by_exchange_warps
  // the epilogue stores into d (= scatter_d[comm.rank], ld = N) and the exchange warps
  // copy each tile to its owner and publish its flag there (kernels/gemm/tile_owner_scatter.cuh).
  int scatter_world;
  int scatter_band_tile_rows;
  void* scatter_d[kMaxWorld];
  uint32_t* scatter_flags[kMaxWorld];
  bool scatter_by_exchange_warps;
};

// Decode-sized matmul_all_reduce in one kernel (kernels/gemm/decode_matmul_all_reduce.h):
//   output[M, N] = Σ_r A_r @ B_r (+ bias), or this rank's A @ B alone.
// A, B and their layouts as in TileGemmParams; output row-major [M, N] (ld = N).
struct DecodeMatmulAllReduceParams {
  const void* a;
  const void* b;
  void* output;
  const void* bias;  // [N] or null, added once after the rank sum (ignored without all_reduce)
  int64_t lda, ldb;
  int m, n, k;
  bool b_transposed;
  DType dtype;      // kBFloat16 or kFloat16
  bool all_reduce;  // false: output = this rank's rounded partial, no communication
  bool ll;          // push on LL lines (M·N·2 <= kDecodeLLCapacityBytes): no fence, no flags
  bool ll128;       // push on LL128 lines instead (decode_ll128_fits; NVLink Hopper groups only)
  int sm_count;     // CTAs at most (one per SM)
  int op;           // OpId, for timeout messages
  CommHandle comm;
};

}  // namespace distfuse
