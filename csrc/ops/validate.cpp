#include "ops/validate.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace distfuse::ops {

GroupInfo resolve_group(const char* op, c10::string_view group_name) {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(std::string(group_name));
  } catch (const std::exception&) {
    TORCH_CHECK(false, "distfuse.", op, ": unknown group_name '", group_name,
                "': pass a torch.distributed ProcessGroup or its .group_name");
  }
  return {pg->getRank(), pg->getSize()};
}

void check_same_device_dtype(const char* op, const char* ref_name, const at::Tensor& ref,
                             const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device() == ref.device(), "distfuse.", op, ": ", name, " must be on the device of ",
              ref_name, " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "distfuse.", op, ": ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  // float64 runs the reference paths; float8 types have no matmul or reduction here.
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kBFloat16 || s == at::kHalf || s == at::kFloat || s == at::kDouble, "distfuse.", op,
              ": ", name, " must be bfloat16, float16, float32 or float64, got ", s);
}

void check_divisible(const char* op, const char* what, int64_t value, int64_t world) {
  TORCH_CHECK(value % world == 0, "distfuse.", op, ": ", what, " = ", value,
              " must be divisible by the group size ", world);
}

void fail_launch(const char* op, const char* schedule, const char* launch, const std::string& shape,
                 const char* error) {
  TORCH_CHECK(false, "distfuse.", op, " (", schedule, ", ", shape, "): ", launch, " failed: ", error,
              ". The other ranks of the group may wait for this call until the workspace's timeout.");
}

int64_t check_matmul(const char* op, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias) {
  check_float(op, "a", a);
  TORCH_CHECK(a.dim() >= 2, "distfuse.", op, ": a must have shape (..., M, K) with at least 2 dims, got ",
              a.sizes());
  TORCH_CHECK(b.dim() == 2, "distfuse.", op, ": b must have shape (K, N), got ", b.sizes());
  check_same_device_dtype(op, "a", a, "b", b);
  TORCH_CHECK(b.size(0) == a.size(-1), "distfuse.", op,
              ": b must have shape (K, N) with K = a.size(-1) = ", a.size(-1), ", got b of shape ",
              b.sizes());
  const int64_t n = b.size(1);
  if (bias.has_value()) {
    check_same_device_dtype(op, "a", a, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "distfuse.", op,
                ": bias must have shape (N,) with N = b.size(1) = ", n, ", got ", bias->sizes());
  }
  return n;
}

void check_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, std::optional<double> scale) {
  check_float(op, "q", q);
  TORCH_CHECK(q.dim() == 4, "distfuse.", op, ": q must have shape (B, Hq, S/W, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "distfuse.", op, ": k must have shape (B, Hkv, S/W, D), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "distfuse.", op, ": v must have the shape of k ", k.sizes(),
              ", got ", v.sizes());
  check_same_device_dtype(op, "q", q, "k", k);
  check_same_device_dtype(op, "q", q, "v", v);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "distfuse.", op, ": k must have shape (B, Hkv, S/W, D) = (", q.size(0), ", Hkv, ",
              q.size(2), ", ", q.size(3), ") to match q, got ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "distfuse.", op,
              ": the number of key/value heads Hkv = ", k.size(1),
              " must divide the number of query heads Hq = ", q.size(1));
  if (scale.has_value())
    TORCH_CHECK(*scale > 0, "distfuse.", op, ": scale must be > 0, got ", *scale);
}

void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& residual,
                    const at::Tensor& weight, double eps) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "distfuse.", op, ": x must have shape (..., N), got ", x.sizes());
  TORCH_CHECK(residual.sizes() == x.sizes(), "distfuse.", op, ": residual must have the shape of x ",
              x.sizes(), ", got ", residual.sizes());
  check_same_device_dtype(op, "x", x, "residual", residual);
  check_same_device_dtype(op, "x", x, "weight", weight);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "distfuse.", op,
              ": weight must have shape (N,) with N = x.size(-1) = ", x.size(-1), ", got ",
              weight.sizes());
  TORCH_CHECK(eps > 0, "distfuse.", op, ": eps must be > 0, got ", eps);
}

}  // namespace distfuse::ops

namespace distfuse::ops {

GroupInfo check_all_reduce_args(const at::Tensor& x, c10::string_view group_name) {
  return resolve_group("all_reduce", group_name);
}

GroupInfo check_matmul_all_reduce_args(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name,
                                       const std::optional<at::Tensor>& bias) {
  check_matmul("matmul_all_reduce", a, b, bias);
  return resolve_group("matmul_all_reduce", group_name);
}

GroupInfo check_matmul_reduce_scatter_args(const at::Tensor& a, const at::Tensor& b,
                                           c10::string_view group_name) {
  const char* op = "matmul_reduce_scatter";
  check_matmul(op, a, b, std::nullopt);
  GroupInfo g = resolve_group(op, group_name);
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < a.dim(); ++d) m *= a.size(d);
  check_divisible(op, "M (the product of a's leading dims)", m, g.size);
  return g;
}

GroupInfo check_all_gather_matmul_args(const at::Tensor& a, const at::Tensor& b,
                                       c10::string_view group_name) {
  check_matmul("all_gather_matmul", a, b, std::nullopt);
  return resolve_group("all_gather_matmul", group_name);
}

GroupInfo check_attention_all_gather_args(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, c10::string_view group_name,
                                          std::optional<double> scale) {
  check_attention("attention_all_gather", q, k, v, scale);
  return resolve_group("attention_all_gather", group_name);
}

GroupInfo check_all_reduce_rms_norm_args(const at::Tensor& x, const at::Tensor& residual,
                                         const at::Tensor& weight, double eps,
                                         c10::string_view group_name) {
  check_rms_norm("all_reduce_rms_norm", x, residual, weight, eps);
  return resolve_group("all_reduce_rms_norm", group_name);
}

}  // namespace distfuse::ops
