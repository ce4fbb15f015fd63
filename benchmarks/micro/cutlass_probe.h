// What the CUTLASS GEMM probes share: bf16 GEMMs D[rows] = A[row0 + rows] @ W[N, K]^T
// (+ beta C) from CUTLASS's own sm_90a kernels, random fills of their element type,
// CHECK_CUTLASS; the rest of what the probes share is in probe_check.h.
#pragma once

#ifndef NDEBUG
#define NDEBUG  // CUTLASS's device asserts serialize the wgmma pipeline
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "probe_check.h"

#define CHECK_CUTLASS(x)                                                                          \
  do {                                                                                            \
    cutlass::Status s_ = (x);                                                                     \
    if (s_ != cutlass::Status::kSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cutlassGetStatusString(s_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace probe {

using Element = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;  // W [N, K] row-major is B [K, N] K-major
using LayoutC = cutlass::layout::RowMajor;
constexpr int kAlign = 8;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

template <class TileShape, class MainloopSchedule, class EpilogueSchedule>
struct GemmOf {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutC, kAlign, Element, LayoutC,
      kAlign, EpilogueSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutW, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// 128 x 256 tiles, both consumer warp groups on one tile (the tile GEMM's prefill shape):
// a tile's epilogue stalls its MMAs.
using CoopGemm = GemmOf<cute::Shape<cute::_128, cute::_256, cute::_64>,
                        cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                        cutlass::epilogue::TmaWarpSpecializedCooperative>::Gemm;
// 128 x 128 tiles, one consumer warp group per tile: one group's epilogue runs under the
// other's MMAs.
using PingpongGemm = GemmOf<cute::Shape<cute::_128, cute::_128, cute::_64>,
                            cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                            cutlass::epilogue::TmaWarpSpecialized>::Gemm;

struct Shape {
  int m, n, k;
};

// One launch of `Gemm` over rows [row0, row0 + rows) of A; C and D point at their first
// row (any GPU's memory). sm_count 0: all SMs.
template <class Gemm>
struct GemmLaunch {
  Gemm gemm;
  void* workspace = nullptr;

  GemmLaunch(int device, cudaStream_t stream, const Shape& s, const Element* a, const Element* w, int row0,
             int rows, float beta, const Element* c, Element* d, int sm_count = 0) {
    CHECK(cudaSetDevice(device));
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {rows, s.n, s.k, 1},
        {a + size_t(row0) * s.k, cutlass::make_cute_packed_stride(StrideA{}, {rows, s.k, 1}), w,
         cutlass::make_cute_packed_stride(StrideB{}, {s.n, s.k, 1})},
        {{1.0f, beta}, c, cutlass::make_cute_packed_stride(StrideC{}, {rows, s.n, 1}), d,
         cutlass::make_cute_packed_stride(StrideD{}, {rows, s.n, 1})}};
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    CHECK_CUTLASS(gemm.can_implement(args));
    const size_t bytes = Gemm::get_workspace_size(args);
    if (bytes) CHECK(cudaMalloc(&workspace, bytes));
    CHECK_CUTLASS(gemm.initialize(args, workspace, stream));
  }
  GemmLaunch(const GemmLaunch&) = delete;
  GemmLaunch& operator=(const GemmLaunch&) = delete;
  ~GemmLaunch() { cudaFree(workspace); }
  void run(cudaStream_t stream) { CHECK_CUTLASS(gemm.run(stream)); }
};

inline void fill_random(Element* p, size_t n, uint32_t seed) {
  fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(p), int64_t(n), seed);
  CHECK(cudaGetLastError());
}

}  // namespace probe
