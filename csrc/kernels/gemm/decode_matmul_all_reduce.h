// Decode-sized matmul_all_reduce in one kernel (torch-free): a skinny GEMM whose
// epilogue pushes every finished block of the partial product straight into each
// peer's workspace, after which every rank sums the W partials of its blocks.
//
//   out[M, N] = Σ_r A_r[M, K] @ B_r[K, N] (+ bias)        fp32 accumulation
//
// Where streaming the weights dominates (M up to ~128) the all-reduce should add
// only its last hop: no second kernel, no launch, no wait for the whole GEMM.
//
// Work units
// ----------
// A unit is a block of kDecodeBlockN output columns by up to kDecodeBlockM rows;
// CTA c of a grid of G computes units c, c + G, ... (identical on every rank).
// Inside a CTA, 8 warps = 4 column groups (16 columns each) x 2 halves of every
// 128-deep K stage (a weight column's 256 contiguous bytes per stage when B is
// transposed: longer runs per DRAM row read faster than 64-deep stages did). The
// weights are the M operand of mma.sync.m16n8k16 (columns of out as its rows) and
// the tokens its N operand (8 per MMA), so M = 1 wastes no tensor-core rows. B and A
// are streamed by cp.async through a ring of stages in shared memory (XOR-swizzled
// rows, ldmatrix; .trans for row-major B).
//
// Schedule of CTA c on rank r (call epoch e)
// ------------------------------------------
//   block 0 first: entry(e) ──▶ every peer      ("r finished its previous calls")
//   for each unit u of c:
//     mainloop(u)   B_r[:, u] from HBM, A_r from L2, fp32 in registers
//     epilogue(u)   sum of the two K halves, rounded to T (smem)
//     [first unit]  wait entry(e) of every peer
//     push(u)       slot_p[r][u] <- partial, for every rank p (self included);
//                   then flag received_p(u, r) = e   (release, system scope)
//   for each unit u of c:
//     wait received_r(u, p) = e of every peer p     (acquire, system scope)
//     out[u] = Σ_{p = 0..W-1} slot_r[p][u] (fp32, rank order) + bias, rounded once
//
//      rank 0, CTA c:  [entry][ mainloop u ........ ][epi][push]─┐  [wait][Σ u]
//      rank 1, CTA c:  [entry][ mainloop u ....... ][epi][push]─┐└──▶▲
//                                                               └────────▶ rank 0
// Pushes of a CTA's earlier units travel while it computes its later ones.
//
// Push lines instead of slots and flags (no release, no received flag): LL lines
// (4 elements and the epoch twice per 16-byte store) or LL128 lines (15 8-byte words
// of the unit and the epoch per 128-byte store of 8 lanes; groups that allow them,
// see distfuse/comm/signal.cuh), each kind in its own part of the decode LL region
// (LL128: [src][unit][line]). The sum polls each line until its epoch is the call's.
//
// Memory, in the tile region of every rank (mn = M·N elements): slot[src] at
// (1 + src)·mn, laid out like out. Flags of kChannelDecodeGemm: entry[src] at
// src, received(u, src) at kMaxWorld·(1 + u) + src. The call epoch is
// counters(kChannelDecodeGemm)[0]; the last CTA of a call stores it.
//
// Reuse: a rank pushes into a peer's slots only after that peer entered the same
// call, i.e. finished every kernel of its previous calls (they read slots and
// other regions of the tile region); so a single slot per source suffices.
// Deadlock freedom: the grid is at most one CTA per SM (resident together), every
// CTA pushes all its units before it waits, and a CTA waits only for peers' block
// 0 (entry) and peers' CTA c (its own units). Every wait is bounded.
//
// Same bits as the unfused order: with all_reduce == false the kernel writes this
// rank's rounded partial to `output` and nothing else; the distfuse all-reduce of
// that partial sums in the same rank order, in fp32, and adds the bias last.
#pragma once

#include <cuda_runtime_api.h>

#include "distfuse/comm/handle.h"
#include "distfuse/params.h"

namespace distfuse {

constexpr int kDecodeBlockN = 64;   // output columns per work unit
constexpr int kDecodeBlockM = 128;  // output rows per work unit (tokens)

#if defined(__CUDACC__)
#define DF_DECODE_HD __host__ __device__
#else
#define DF_DECODE_HD
#endif

// Work units of a call (the flag slots of the channel bound them).
DF_DECODE_HD inline int64_t decode_units(int64_t m, int64_t n) {
  return (m + kDecodeBlockM - 1) / kDecodeBlockM * ((n + kDecodeBlockN - 1) / kDecodeBlockN);
}

// LL128 lines of a unit of `rows` x `cols`: its rows' 8-byte words (cols / 4 per row),
// kLL128LineWords per line.
DF_DECODE_HD inline int64_t decode_ll128_unit_lines(int64_t rows, int64_t cols) {
  return (rows * (cols / 4) + kLL128LineWords - 1) / kLL128LineWords;
}

// Whether the LL128 lines of every unit of an [m, n] output fit their part of the
// decode LL region (room for a full unit's lines each).
DF_DECODE_HD inline bool decode_ll128_fits(int64_t m, int64_t n) {
  const int64_t unit_lines = decode_ll128_unit_lines(m < kDecodeBlockM ? m : kDecodeBlockM, kDecodeBlockN);
  return decode_units(m, n) * unit_lines * int64_t(kLL128LineBytes) <= int64_t(kDecodeLL128BytesPerSlot);
}

#undef DF_DECODE_HD

// Shapes the kernel takes: N, K multiples of 8 and few enough units.
bool decode_shape_supported(int64_t m, int64_t n, int64_t k);

// What both decode kernels (this one and kernels/gemm/decode_split_k.h) ask of a call's
// operands: bf16 or fp16, 16-byte aligned pointers, lda and ldb multiples of 8 that
// cover K (and N for a row-major B), at least one SM, and a group size they hold.
inline bool decode_operands_valid(const DecodeMatmulAllReduceParams& p) {
  return p.dtype != DType::kFloat32 && p.a && p.b && p.output && aligned16(p.a) && aligned16(p.b) &&
         aligned16(p.output) && (!p.bias || aligned16(p.bias)) && p.lda % 8 == 0 && p.ldb % 8 == 0 &&
         p.lda >= p.k && p.ldb >= (p.b_transposed ? p.k : p.n) && p.sm_count >= 1 &&
         (!p.all_reduce || (p.comm.world >= 1 && p.comm.world <= kMaxWorld));
}

// Enqueues the kernel on `stream`. cudaErrorInvalidValue for a shape or pointer
// it does not take (see decode_shape_supported; K, N, lda, ldb multiples of 8,
// 16-byte aligned pointers, bf16 or fp16); else the launch status.
cudaError_t launch_decode_matmul_all_reduce(const DecodeMatmulAllReduceParams& p, cudaStream_t stream);

}  // namespace distfuse
