#include "ops/control.h"

#include <atomic>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>

#include <c10/util/Exception.h>

#ifdef DISTFUSE_WITH_CUDA
#include "comm/workspace.h"
#endif

namespace distfuse::ops {
namespace {

std::mutex g_mutex;
std::map<std::string, std::string> g_forced;          // op -> path
std::map<std::string, int64_t> g_tuning;              // key -> value
std::atomic<bool> g_any_forced{false};
std::atomic<bool> g_any_tuning{false};

// The last path of each fused op, recorded on every call: a lock-free slot per op
// (op and path names are string literals).
constexpr const char* kRecordedOps[] = {"all_reduce", "matmul_all_reduce"};
std::atomic<const char*> g_last[std::size(kRecordedOps)] = {};

int recorded_op_index(const char* op) {
  for (size_t i = 0; i < std::size(kRecordedOps); ++i)
    if (std::strcmp(kRecordedOps[i], op) == 0) return static_cast<int>(i);
  return -1;
}

}  // namespace

void set_forced_path(std::string op, std::string path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (path.empty() || path == "auto") g_forced.erase(op);
  else g_forced[op] = path;
  g_any_forced = !g_forced.empty();
}

std::string forced_path(std::string op) {
  if (!g_any_forced.load(std::memory_order_relaxed)) return "";
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_forced.find(op);
  return it == g_forced.end() ? "" : it->second;
}

void record_path(const char* op, const char* path) {
  const int i = recorded_op_index(op);
  TORCH_INTERNAL_ASSERT(i >= 0, "record_path: unknown op ", op);
  g_last[i].store(path, std::memory_order_relaxed);
}

std::string last_path(std::string op) {
  const int i = recorded_op_index(op.c_str());
  const char* path = i >= 0 ? g_last[i].load(std::memory_order_relaxed) : nullptr;
  return path ? path : "";
}

void set_tuning(std::string key, int64_t value) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (value == 0) g_tuning.erase(key);
  else g_tuning[key] = value;
  g_any_tuning = !g_tuning.empty();
}

int64_t get_tuning(std::string key) {
  if (!g_any_tuning.load(std::memory_order_relaxed)) return 0;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_tuning.find(key);
  return it == g_tuning.end() ? 0 : it->second;
}

#ifdef DISTFUSE_WITH_CUDA
bool built_with_cuda() { return true; }
bool init_workspace(std::string group_name, int64_t max_bytes, int64_t timeout_ms) {
  TORCH_CHECK(max_bytes >= 0, "distfuse.init_workspace: max_bytes must be >= 0, got ", max_bytes);
  TORCH_CHECK(timeout_ms >= 0, "distfuse.init_workspace: timeout_ms must be >= 0, got ", timeout_ms);
  return comm::Workspace::create(group_name, static_cast<size_t>(max_bytes),
                                 static_cast<uint64_t>(timeout_ms))
      .p2p();
}
void destroy_workspace(std::string group_name) { comm::Workspace::destroy(group_name); }
std::vector<int64_t> workspace_info(std::string group_name) {
  return comm::Workspace::info(group_name);
}
#else
int64_t side_streams_made() { return 0; }
bool built_with_cuda() { return false; }
bool init_workspace(std::string, int64_t, int64_t) { return false; }
void destroy_workspace(std::string) {}
std::vector<int64_t> workspace_info(std::string) { return {}; }
#endif

}  // namespace distfuse::ops
