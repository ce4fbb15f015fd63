// Reference implementations: the plain composition of ATen ops and c10d
// functional collectives. They are the CPU kernels (gloo) and the CUDA fallback
// (NCCL) where a fused kernel cannot run or cannot win. Arguments are validated
// by the caller (ops/validate.h).
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace distfuse::ops {

at::Tensor all_reduce_reference(const at::Tensor& x, c10::string_view group_name);
at::Tensor matmul_all_reduce_reference(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name,
                                       const std::optional<at::Tensor>& bias);
at::Tensor matmul_reduce_scatter_reference(const at::Tensor& a, const at::Tensor& b,
                                           c10::string_view group_name, int64_t world);
at::Tensor all_gather_matmul_reference(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name, int64_t world);
at::Tensor attention_all_gather_reference(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, c10::string_view group_name,
                                          int64_t rank, int64_t world, bool is_causal,
                                          std::optional<double> scale);
std::tuple<at::Tensor, at::Tensor> all_reduce_rms_norm_reference(const at::Tensor& x,
                                                                 const at::Tensor& residual,
                                                                 const at::Tensor& weight,
                                                                 double eps,
                                                                 c10::string_view group_name);
// rms_norm(y) * weight in fp32, rounded once to y's dtype.
at::Tensor rms_norm_reference(const at::Tensor& y, const at::Tensor& weight, double eps);

}  // namespace distfuse::ops
