// The reduction every distfuse all-reduce of GEMM outputs shares: fp32 sums in a
// fixed rank order, so that every rank computes the same bits.
#pragma once

#include "kernels/common/vec.cuh"

namespace distfuse {

// Σ over ranks 0..w-1 (in that order, fp32) of the 16-byte vectors x[0], x[stride],
// ..., x[(w - 1) * stride], plus the bias vector at `bias` when given, rounded once.
template <typename T>
__device__ __forceinline__ uint4 sum_strided_in_rank_order(const uint4* x, int stride, int w, const T* bias) {
  constexpr int kVec = 16 / sizeof(T);
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
  for (int src = 0; src < w; ++src) accumulate<T, 16>(acc, to_pack<T>(x[src * stride]));
  if (bias) {
    const Pack<T, 16> b = to_pack<T>(load_plain(bias));
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += to_float(b.elem(e));
  }
  return from_pack<T>(round_pack<T, 16>(acc));
}

// The same sum of the W vectors x (a group size known at compile time).
template <typename T, int W>
__device__ __forceinline__ uint4 sum_in_rank_order(const uint4 (&x)[W], const T* bias) {
  return sum_strided_in_rank_order<T>(x, 1, W, bias);
}

// For the vectors v = base + u * kThreads (u < U, v < count) of one thread:
// Σ over ranks 0..W-1 (in that order, fp32) of the 16-byte vectors at
// source(src, v), plus bias at column bias_col(v) when given, rounded once,
// handed to sink(v, result). All U x W loads are issued before the first use.
template <typename T, int W, int U, int kThreads, typename Index, typename Source, typename BiasCol,
          typename Sink>
__device__ __forceinline__ void sum_batch_in_rank_order(Index base, Index count, Source source,
                                                        const T* bias, BiasCol bias_col, Sink sink) {
  uint4 x[U][W];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const Index v = base + u * kThreads;
#pragma unroll
    for (int src = 0; src < W; ++src)
      if (v < count) x[u][src] = load_cg(source(src, v));
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const Index v = base + u * kThreads;
    if (v >= count) continue;
    sink(v, sum_in_rank_order<T, W>(x[u], bias ? bias + bias_col(v) : nullptr));
  }
}

}  // namespace distfuse
