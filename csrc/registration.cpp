// The only TORCH_LIBRARY(distfuse, m): every schema and tag.
//
// Backends register kernels in csrc/ops/ (TORCH_LIBRARY_IMPL per backend);
// fake (Meta) kernels are registered from Python in distfuse/_fake.py.
#include <torch/library.h>

#include "ops/control.h"

TORCH_LIBRARY(distfuse, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};

  // Collective ops: group_name names a registered ProcessGroup (ProcessGroup.group_name).
  m.def("all_reduce(Tensor x, str group_name) -> Tensor", tags);
  // bias is not keyword-only so that autograd can return its gradient.
  m.def("matmul_all_reduce(Tensor a, Tensor b, str group_name, Tensor? bias=None) -> Tensor", tags);
  m.def("matmul_reduce_scatter(Tensor a, Tensor b, str group_name) -> Tensor", tags);
  m.def("all_gather_matmul(Tensor a, Tensor b, str group_name) -> Tensor", tags);
  m.def(
      "attention_all_gather(Tensor q, Tensor k, Tensor v, str group_name, *, bool is_causal=False, "
      "float? scale=None) -> Tensor",
      tags);
  m.def(
      "all_reduce_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, str group_name) -> "
      "(Tensor, Tensor)",
      tags);

  // Workspace management and dispatcher control (host side, not traced).
  // These take no tensors, so their one kernel is registered here (catch-all).
  m.def("_init_workspace(str group_name, int tile_bytes, int timeout_ms) -> bool",
        &distfuse::ops::init_workspace);
  m.def("_destroy_workspace(str group_name) -> ()", &distfuse::ops::destroy_workspace);
  m.def("_workspace_info(str group_name) -> int[]", &distfuse::ops::workspace_info);
  m.def("_side_streams_made() -> int", &distfuse::ops::side_streams_made);
  m.def("_set_forced_path(str op, str path) -> ()", &distfuse::ops::set_forced_path);
  m.def("_forced_path(str op) -> str", &distfuse::ops::forced_path);
  m.def("_last_path(str op) -> str", &distfuse::ops::last_path);
  m.def("_set_tuning(str key, int value) -> ()", &distfuse::ops::set_tuning);
  m.def("_get_tuning(str key) -> int", &distfuse::ops::get_tuning);
  m.def("_built_with_cuda() -> bool", &distfuse::ops::built_with_cuda);
  m.def("_build_id() -> str", &distfuse::ops::build_id);
}
