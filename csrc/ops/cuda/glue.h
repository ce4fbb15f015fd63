// Helpers shared by the CUDA glue of the fused ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "comm/workspace.h"
#include "distfuse/params.h"

namespace distfuse::ops {

// bf16, fp16 or fp32 map to a kernel dtype; other dtypes have no fused path.
bool kernel_dtype(at::ScalarType t, DType* out);

// `t` contiguous and 16-byte aligned (copied only when it is not).
at::Tensor contiguous_aligned(const at::Tensor& t);

// Checks that `t` lives on the workspace's GPU.
void check_workspace_device(const char* op, const char* name, const at::Tensor& t,
                            const comm::Workspace& ws);

enum class AllReducePath { kOneShot, kTwoShot, kTwoShotLL, kTwoShotLL128, kOneShotLL128 };

// Σ over the group of `input` (+ bias[i % bias.numel()] once) into `out` with the
// distfuse kernels, on the current stream. input and out: same size, dtype and
// device, contiguous, 16-byte aligned; out may alias input. `two_shot_blocks` > 0
// caps the two-shot kernel's CTAs (else the tuning table decides).
void run_all_reduce(const comm::Workspace& ws, const at::Tensor& input, at::Tensor& out,
                    const at::Tensor* bias, AllReducePath path, int op, int two_shot_blocks = 0);

// The path the tuning table (or a forced path) picks for `bytes` per rank;
// "reference" is reported through *reference.
AllReducePath choose_all_reduce_path(const comm::Workspace& ws, int64_t bytes, DType dtype,
                                     bool* reference);

const char* path_name(AllReducePath p);

}  // namespace distfuse::ops
