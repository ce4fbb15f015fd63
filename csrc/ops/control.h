// Host-side control of the dispatcher: forced paths (tests, benchmarks), the
// path each op took last (reported by benchmarks), tuning overrides, and the
// workspace management entry points exposed as ops.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace distfuse::ops {

// Paths an op may take; "auto" lets the dispatcher decide.
void set_forced_path(std::string op, std::string path);
// The forced path for `op`, or "" when the dispatcher decides.
std::string forced_path(std::string op);
// `op` and `path` must be string literals (they are kept as pointers).
void record_path(const char* op, const char* path);
std::string last_path(std::string op);

// Tuning overrides (e.g. "all_reduce.one_shot_max_bytes"); 0 removes an override.
void set_tuning(std::string key, int64_t value);
// The override for `key`, or 0 when none is set.
int64_t get_tuning(std::string key);

// Whether this library was built with the fused CUDA kernels.
bool built_with_cuda();
// The source revision this library was built from (git commit, "+dirty" when the
// tracked files differed from it, or "unknown"); defined in a file the build generates.
std::string build_id();

bool init_workspace(std::string group_name, int64_t tile_bytes, int64_t timeout_ms);
void destroy_workspace(std::string group_name);
std::vector<int64_t> workspace_info(std::string group_name);
// How many side streams the fused schedules have made in this process (tests: host threads
// reuse them; ops/cuda/side_streams.cpp).
int64_t side_streams_made();

}  // namespace distfuse::ops
