#include "ops/reference.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/distributed/c10d/Functional.hpp>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include "ops/validate.h"

namespace distfuse::ops {
namespace {

at::Tensor wait(const at::Tensor& t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("_c10d_functional::wait_tensor", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(t);
}

// bf16/fp16 are summed in fp32 (DESIGN: fp32 accumulation); the caller rounds.
bool is_half(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
}

at::Tensor sum_over_group(const at::Tensor& x, c10::string_view group_name) {
  at::Tensor wide = is_half(x) ? x.to(at::kFloat) : x.contiguous();
  return wait(c10d::all_reduce(wide, "sum", std::string(group_name)));
}

at::Tensor functional_all_reduce(const at::Tensor& x, c10::string_view group_name) {
  return sum_over_group(x, group_name).to(x.scalar_type());
}

int64_t leading_rows(const at::Tensor& a) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < a.dim(); ++d) m *= a.size(d);
  return m;
}

// True when the group moves tensors of x's device with gloo while x is on a GPU (ranks
// sharing GPUs, where NCCL refuses the group). gloo's all_gather_into_tensor crashes
// the process (SIGSEGV) on CUDA tensors in torch 2.11, so such a group gathers host
// copies; its all_reduce and reduce_scatter_tensor take CUDA tensors.
bool gloo_group_on_gpu(const at::Tensor& x, c10::string_view group_name) {
  if (!x.is_cuda()) return false;
  const auto pg = c10d::resolve_process_group(std::string(group_name));
  try {
    return pg->getBackend(x.device().type())->getBackendName() == "gloo";
  } catch (const std::exception&) {
    return false;  // no backend for the device: the collective reports that itself
  }
}

at::Tensor functional_all_gather(const at::Tensor& x, int64_t world, c10::string_view group_name) {
  if (gloo_group_on_gpu(x, group_name))
    return functional_all_gather(x.cpu(), world, group_name).to(x.device());
  return wait(c10d::all_gather_into_tensor(x.contiguous(), world, std::string(group_name)));
}

// [B, H, s, D] on each rank -> [B, H, W*s, D], ranks in order along the sequence.
at::Tensor gather_sequence(const at::Tensor& t, int64_t world, c10::string_view group_name) {
  at::Tensor seq_first = t.permute({2, 0, 1, 3});
  return functional_all_gather(seq_first, world, group_name).permute({1, 2, 0, 3});
}

}  // namespace

at::Tensor all_reduce_reference(const at::Tensor& x, c10::string_view group_name) {
  return functional_all_reduce(x, group_name);
}

at::Tensor matmul_all_reduce_reference(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name,
                                       const std::optional<at::Tensor>& bias) {
  at::Tensor y = sum_over_group(at::matmul(a, b), group_name);
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return y.to(a.scalar_type());
}

at::Tensor matmul_reduce_scatter_reference(const at::Tensor& a, const at::Tensor& b,
                                           c10::string_view group_name, int64_t world) {
  at::Tensor partial = at::matmul(a.reshape({leading_rows(a), a.size(-1)}), b);
  at::Tensor wide = is_half(partial) ? partial.to(at::kFloat) : partial.contiguous();
  return wait(c10d::reduce_scatter_tensor(wide, "sum", world, std::string(group_name)))
      .to(a.scalar_type());
}

at::Tensor all_gather_matmul_reference(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name, int64_t world) {
  at::Tensor gathered =
      functional_all_gather(a.reshape({leading_rows(a), a.size(-1)}), world, group_name);
  return at::matmul(gathered, b);
}

at::Tensor attention_all_gather_reference(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, c10::string_view group_name,
                                          int64_t rank, int64_t world, bool is_causal,
                                          std::optional<double> scale) {
  at::Tensor k_all = gather_sequence(k, world, group_name);
  at::Tensor v_all = gather_sequence(v, world, group_name);
  const int64_t groups = q.size(1) / k.size(1);
  if (groups > 1) {
    k_all = k_all.repeat_interleave(groups, 1);
    v_all = v_all.repeat_interleave(groups, 1);
  }
  std::optional<at::Tensor> mask;
  if (is_causal) {
    // Queries of this rank sit at global positions rank*s + i.
    const int64_t s = q.size(2);
    auto opts = at::TensorOptions().device(q.device()).dtype(at::kLong);
    at::Tensor q_pos = at::arange(rank * s, (rank + 1) * s, opts).unsqueeze(1);
    at::Tensor k_pos = at::arange(world * s, opts).unsqueeze(0);
    mask = k_pos.le(q_pos);
  }
  return at::scaled_dot_product_attention(q, k_all, v_all, mask, 0.0, false, scale).contiguous();
}

// The norm's and the residual sum's arithmetic: float32, or float64 for float64 inputs.
static at::ScalarType rms_norm_accumulation(const at::Tensor& t) { return at::promote_types(t.scalar_type(), at::kFloat); }

at::Tensor rms_norm_reference(const at::Tensor& y, const at::Tensor& weight, double eps) {
  at::Tensor yf = y.to(rms_norm_accumulation(y));
  at::Tensor inv = at::rsqrt(yf.pow(2).mean({-1}, true) + eps);
  return (yf * inv * weight.to(yf.scalar_type())).to(y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> all_reduce_rms_norm_reference(const at::Tensor& x,
                                                                 const at::Tensor& residual,
                                                                 const at::Tensor& weight,
                                                                 double eps,
                                                                 c10::string_view group_name) {
  const at::ScalarType acc = rms_norm_accumulation(x);
  at::Tensor y = (sum_over_group(x, group_name).to(acc) + residual.to(acc)).to(x.scalar_type());
  return {rms_norm_reference(y, weight, eps), y};
}

// ---- Kernels that validate, then run the reference: every op on CPU (gloo), and
// on CUDA (NCCL) each op that has no fused kernel in this build. ----

namespace {

at::Tensor all_reduce_checked_reference(const at::Tensor& x, c10::string_view group_name) {
  check_all_reduce_args(x, group_name);
  return all_reduce_reference(x, group_name);
}

at::Tensor matmul_all_reduce_checked_reference(const at::Tensor& a, const at::Tensor& b,
                                 c10::string_view group_name,
                                 const std::optional<at::Tensor>& bias) {
  check_matmul_all_reduce_args(a, b, group_name, bias);
  return matmul_all_reduce_reference(a, b, group_name, bias);
}

at::Tensor matmul_reduce_scatter_checked_reference(const at::Tensor& a, const at::Tensor& b,
                                     c10::string_view group_name) {
  GroupInfo g = check_matmul_reduce_scatter_args(a, b, group_name);
  return matmul_reduce_scatter_reference(a, b, group_name, g.size);
}

at::Tensor all_gather_matmul_checked_reference(const at::Tensor& a, const at::Tensor& b,
                                 c10::string_view group_name) {
  GroupInfo g = check_all_gather_matmul_args(a, b, group_name);
  return all_gather_matmul_reference(a, b, group_name, g.size);
}

at::Tensor attention_all_gather_checked_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    c10::string_view group_name, bool is_causal,
                                    std::optional<double> scale) {
  GroupInfo g = check_attention_all_gather_args(q, k, v, group_name, scale);
  return attention_all_gather_reference(q, k, v, group_name, g.rank, g.size, is_causal, scale);
}

std::tuple<at::Tensor, at::Tensor> all_reduce_rms_norm_checked_reference(const at::Tensor& x,
                                                           const at::Tensor& residual,
                                                           const at::Tensor& weight, double eps,
                                                           c10::string_view group_name) {
  check_all_reduce_rms_norm_args(x, residual, weight, eps, group_name);
  return all_reduce_rms_norm_reference(x, residual, weight, eps, group_name);
}

}  // namespace

TORCH_LIBRARY_IMPL(distfuse, CPU, m) {
  m.impl("all_reduce", &all_reduce_checked_reference);
  m.impl("matmul_all_reduce", &matmul_all_reduce_checked_reference);
  m.impl("matmul_reduce_scatter", &matmul_reduce_scatter_checked_reference);
  m.impl("all_gather_matmul", &all_gather_matmul_checked_reference);
  m.impl("attention_all_gather", &attention_all_gather_checked_reference);
  m.impl("all_reduce_rms_norm", &all_reduce_rms_norm_checked_reference);
}

TORCH_LIBRARY_IMPL(distfuse, CUDA, m) {
  m.impl("matmul_reduce_scatter", &matmul_reduce_scatter_checked_reference);
  m.impl("all_gather_matmul", &all_gather_matmul_checked_reference);
  m.impl("attention_all_gather", &attention_all_gather_checked_reference);
  m.impl("all_reduce_rms_norm", &all_reduce_rms_norm_checked_reference);
#ifndef DISTFUSE_WITH_CUDA
  // Built without CUDA kernels: the fused ops run their reference on CUDA too.
  m.impl("all_reduce", &all_reduce_checked_reference);
  m.impl("matmul_all_reduce", &matmul_all_reduce_checked_reference);
#endif
}

}  // namespace distfuse::ops
