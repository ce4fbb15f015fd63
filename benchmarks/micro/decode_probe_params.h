// The decode schedules' GEMM alone as the decode probes time it: tokens a [m][k], the
// transposed weight view [n][k] (set p.b per call), bf16, no all-reduce.
#pragma once

#include "distfuse/params.h"

namespace probe {

inline distfuse::DecodeMatmulAllReduceParams gemm_only_params(const void* a, void* output, int m, int n, int k,
                                                             int sm_count) {
  distfuse::DecodeMatmulAllReduceParams p{};
  p.a = a;
  p.output = output;
  p.lda = k;
  p.ldb = k;
  p.m = m;
  p.n = n;
  p.k = k;
  p.b_transposed = true;
  p.dtype = distfuse::DType::kBFloat16;
  p.all_reduce = false;
  p.sm_count = sm_count;
  return p;
}

}  // namespace probe
