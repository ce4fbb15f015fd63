// The ops are registered with their schemas, and the argument checks raise
// errors that name the op, the argument and the values.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "ops/validate.h"

namespace distfuse::ops {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(Registration, EverySchemaIsRegistered) {
  for (const char* name : {"distfuse::all_reduce", "distfuse::matmul_all_reduce",
                           "distfuse::matmul_reduce_scatter", "distfuse::all_gather_matmul",
                           "distfuse::attention_all_gather", "distfuse::all_reduce_rms_norm"}) {
    auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    ASSERT_TRUE(op.has_value()) << name;
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) << name;
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) << name;
  }
}

TEST(Validation, AFailedLaunchNamesTheScheduleTheShapeAndTheError) {
  const std::string message = error_of([] {
    fail_launch("matmul_all_reduce", "pair_exchange", "launch_tile_gemm", "M=512, N=8192, K=4096",
                "invalid argument");
  });
  EXPECT_NE(message.find("distfuse.matmul_all_reduce (pair_exchange, M=512, N=8192, K=4096): "
                         "launch_tile_gemm failed: invalid argument."),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("other ranks of the group may wait for this call until the workspace's timeout"),
            std::string::npos)
      << message;
}

TEST(Validation, MatmulShapesDtypesAndBias) {
  auto a = at::zeros({4, 8});
  EXPECT_NE(error_of([&] { check_matmul("matmul_all_reduce", a, at::zeros({7, 3}), std::nullopt); })
                .find("distfuse.matmul_all_reduce: b must have shape (K, N) with K = a.size(-1) = 8, got b of shape [7, 3]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_matmul("matmul_all_reduce", a, at::zeros({8, 3}, at::kDouble), std::nullopt); })
                .find("b must have the dtype of a"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_matmul("matmul_all_reduce", at::zeros({8}), at::zeros({8, 3}), std::nullopt); })
                .find("a must have shape (..., M, K)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_matmul("matmul_all_reduce", a, at::zeros({8, 3}), at::zeros({4})); })
                .find("bias must have shape (N,) with N = b.size(1) = 3, got [4]"),
            std::string::npos);
  EXPECT_EQ(check_matmul("matmul_all_reduce", a, at::zeros({8, 3}), at::zeros({3})), 3);
}

TEST(Validation, AttentionHeadsAndRmsNorm) {
  auto q = at::zeros({1, 6, 5, 16});
  EXPECT_NE(error_of([&] { check_attention("attention_all_gather", q, at::zeros({1, 4, 5, 16}), at::zeros({1, 4, 5, 16}), std::nullopt); })
                .find("Hkv = 4 must divide the number of query heads Hq = 6"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_rms_norm("all_reduce_rms_norm", at::zeros({2, 8}), at::zeros({2, 8}), at::zeros({7}), 1e-6); })
                .find("weight must have shape (N,) with N = x.size(-1) = 8"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_divisible("matmul_reduce_scatter", "M", 3, 2); })
                .find("M = 3 must be divisible by the group size 2"),
            std::string::npos);
}

TEST(Validation, UnknownGroupNamesTheOp) {
  EXPECT_NE(error_of([&] { resolve_group("all_reduce", "no-such-group"); })
                .find("distfuse.all_reduce: unknown group_name 'no-such-group'"),
            std::string::npos);
}

}  // namespace
}  // namespace distfuse::ops
