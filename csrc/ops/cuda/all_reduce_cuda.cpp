// CUDA glue of all_reduce: validate, pick a path, fill AllReduceParams, launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distfuse/tuning.h"
#include "kernels/allreduce/all_reduce.h"
#include "ops/control.h"
#include "ops/cuda/glue.h"
#include "ops/reference.h"
#include "ops/validate.h"

namespace distfuse::ops {

bool kernel_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kFloat: *out = DType::kFloat32; return true;
    case at::kHalf: *out = DType::kFloat16; return true;
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    default: return false;
  }
}

at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void check_workspace_device(const char* op, const char* name, const at::Tensor& t,
                            const comm::Workspace& ws) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == ws.device(), "distfuse.", op, ": ", name,
              " must be on cuda:", ws.device(),
              " (the device this rank's workspace was created on), got ", t.device());
}

const char* path_name(AllReducePath p) {
  switch (p) {
    case AllReducePath::kOneShot: return "one_shot";
    case AllReducePath::kTwoShotLL: return "two_shot_ll";
    case AllReducePath::kTwoShotLL128: return "two_shot_ll128";
    case AllReducePath::kOneShotLL128: return "one_shot_ll128";
    default: return "two_shot";
  }
}

AllReducePath choose_all_reduce_path(const comm::Workspace& ws, int64_t bytes, DType dtype,
                                     bool* reference) {
  *reference = false;
  const std::string forced = forced_path("all_reduce");
  if (forced == "reference") {
    *reference = true;
    return AllReducePath::kTwoShot;
  }
  // A forced path beyond its capacity (or not allowed here) runs the two-shot.
  if (forced == "one_shot")
    return bytes <= int64_t(ws.one_shot_capacity_bytes()) ? AllReducePath::kOneShot : AllReducePath::kTwoShot;
  const int64_t ll_capacity = all_reduce_two_shot_ll_max_numel(dtype, ws.world()) * dtype_size(dtype);
  if (forced == "two_shot_ll")
    return bytes <= ll_capacity ? AllReducePath::kTwoShotLL : AllReducePath::kTwoShot;
  // Zero where the group does not allow LL128 lines (comm/workspace.h).
  const int64_t ll128_capacity =
      ws.ll128() ? all_reduce_two_shot_ll128_max_numel(dtype, ws.world()) * dtype_size(dtype) : 0;
  if (forced == "two_shot_ll128")
    return bytes <= ll128_capacity ? AllReducePath::kTwoShotLL128 : AllReducePath::kTwoShot;
  const int64_t one_shot_ll128_capacity =
      ws.ll128() ? all_reduce_one_shot_ll128_max_numel(dtype) * dtype_size(dtype) : 0;
  if (forced == "one_shot_ll128")
    return bytes <= one_shot_ll128_capacity ? AllReducePath::kOneShotLL128 : AllReducePath::kTwoShot;
  if (forced == "two_shot") return AllReducePath::kTwoShot;
  switch (choose_all_reduce(bytes, ws.world(), ws.one_shot_capacity_bytes(),
                            get_tuning("all_reduce.one_shot_max_bytes"), ll_capacity,
                            get_tuning("all_reduce.two_shot_ll_max_bytes"), ll128_capacity,
                            get_tuning("all_reduce.two_shot_ll128_max_bytes"), one_shot_ll128_capacity,
                            get_tuning("all_reduce.one_shot_ll128_max_bytes"))) {
    case AllReduceAlgo::kOneShot: return AllReducePath::kOneShot;
    case AllReduceAlgo::kTwoShotLL: return AllReducePath::kTwoShotLL;
    case AllReduceAlgo::kTwoShotLL128: return AllReducePath::kTwoShotLL128;
    case AllReduceAlgo::kOneShotLL128: return AllReducePath::kOneShotLL128;
    default: return AllReducePath::kTwoShot;
  }
}

void run_all_reduce(const comm::Workspace& ws, const at::Tensor& input, at::Tensor& out,
                    const at::Tensor* bias, AllReducePath path, int op, int two_shot_blocks_cap) {
  AllReduceParams p{};
  p.input = input.data_ptr();
  p.output = out.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.bias_period = bias ? bias->numel() : 1;
  p.numel = input.numel();
  TORCH_INTERNAL_ASSERT(kernel_dtype(input.scalar_type(), &p.dtype));
  p.op = op;
  p.blocks = two_shot_blocks_cap > 0
                 ? two_shot_blocks_cap
                 : two_shot_blocks(ws.world(), static_cast<int>(get_tuning("all_reduce.two_shot_blocks")));
  p.chunk_bytes = two_shot_chunk_bytes(ws.world(), get_tuning("all_reduce.two_shot_chunk_bytes"));
  p.dependent_launch = dependent_launch(ws.world(), get_tuning("all_reduce.dependent_launch"));
  p.one_shot_lines_per_thread =
      one_shot_lines_per_thread(ws.world(), static_cast<int>(get_tuning("all_reduce.one_shot_lines_per_thread")));
  p.comm = ws.handle();
  auto stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = path == AllReducePath::kOneShot        ? launch_all_reduce_one_shot(p, stream)
                          : path == AllReducePath::kTwoShotLL    ? launch_all_reduce_two_shot_ll(p, stream)
                          : path == AllReducePath::kTwoShotLL128 ? launch_all_reduce_two_shot_ll128(p, stream)
                          : path == AllReducePath::kOneShotLL128 ? launch_all_reduce_one_shot_ll128(p, stream)
                                                                 : launch_all_reduce_two_shot(p, stream);
  if (err != cudaSuccess)
    fail_launch(op_name(op), path_name(path), "the all-reduce launch", c10::str(p.numel, " elements"),
                cudaGetErrorString(err));
}

namespace {

at::Tensor all_reduce_cuda(const at::Tensor& x, c10::string_view group_name) {
  const std::string name(group_name);
  c10::cuda::CUDAGuard guard(x.device());
  comm::Workspace& ws = comm::Workspace::get(name, "all_reduce");
  if (ws.world() == 1) {
    record_path("all_reduce", "identity");
    return x.clone(at::MemoryFormat::Contiguous);
  }
  DType dtype;
  bool reference = !ws.p2p() || !kernel_dtype(x.scalar_type(), &dtype);
  AllReducePath path = AllReducePath::kTwoShot;
  if (!reference) path = choose_all_reduce_path(ws, x.numel() * x.element_size(), dtype, &reference);
  if (reference) {
    record_path("all_reduce", "reference");
    return all_reduce_reference(x, group_name).contiguous();
  }
  check_workspace_device("all_reduce", "x", x, ws);
  at::Tensor input = contiguous_aligned(x);
  at::Tensor out = at::empty_like(input);
  run_all_reduce(ws, input, out, nullptr, path, kOpAllReduce);
  record_path("all_reduce", path_name(path));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distfuse, CUDA, m) { m.impl("all_reduce", &all_reduce_cuda); }

}  // namespace distfuse::ops
