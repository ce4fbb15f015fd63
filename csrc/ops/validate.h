// Argument checks shared by every backend of every op. Each error names the
// op, the argument and the values seen.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>

namespace distfuse::ops {

struct GroupInfo {
  int64_t rank;
  int64_t size;
};

// Resolves `group_name` to its ProcessGroup; an unknown name is a clear error.
GroupInfo resolve_group(const char* op, c10::string_view group_name);

void check_same_device_dtype(const char* op, const char* ref_name, const at::Tensor& ref,
                             const char* name, const at::Tensor& t);
void check_float(const char* op, const char* name, const at::Tensor& t);
void check_divisible(const char* op, const char* what, int64_t value, int64_t world);

// Raises the error of a failed kernel launch of `op`: it names the schedule, the launch
// function, the call's shape (e.g. "M=512, N=8192, K=4096") and the CUDA error, and warns
// that the other ranks may wait for this one until the workspace's timeout.
[[noreturn]] void fail_launch(const char* op, const char* schedule, const char* launch, const std::string& shape,
                              const char* error);

// a [..., K], b [K, N], bias [N]. Returns N.
int64_t check_matmul(const char* op, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias);
// q [B, Hq, s, D], k and v [B, Hkv, s, D] with Hkv dividing Hq.
void check_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, std::optional<double> scale);
// x and residual [..., N], weight [N], eps > 0.
void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& residual,
                    const at::Tensor& weight, double eps);

}  // namespace distfuse::ops

namespace distfuse::ops {

// Whole-argument checks of each op (group resolved, shapes, divisibility).
GroupInfo check_all_reduce_args(const at::Tensor& x, c10::string_view group_name);
GroupInfo check_matmul_all_reduce_args(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name,
                                       const std::optional<at::Tensor>& bias);
GroupInfo check_matmul_reduce_scatter_args(const at::Tensor& a, const at::Tensor& b,
                                           c10::string_view group_name);
GroupInfo check_all_gather_matmul_args(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name);
GroupInfo check_attention_all_gather_args(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, c10::string_view group_name,
                                          std::optional<double> scale);
GroupInfo check_all_reduce_rms_norm_args(const at::Tensor& x, const at::Tensor& residual,
                                         const at::Tensor& weight, double eps,
                                         c10::string_view group_name);

}  // namespace distfuse::ops
