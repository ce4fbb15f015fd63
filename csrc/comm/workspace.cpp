#include "comm/workspace.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace distfuse::comm {
namespace {

constexpr uint64_t kDefaultTimeoutMs = 60000;

std::mutex g_mutex;
// Never destroyed: freeing peer-mapped memory during interpreter teardown is unsafe.
auto* g_workspaces = new std::map<std::string, std::unique_ptr<Workspace>>();
// How often each group's workspace was created; part of the store keys so that a
// re-created workspace never reads a stale exchange.
auto* g_generation = new std::map<std::string, int>();

uint64_t timeout_from_env(uint64_t requested_ms) {
  if (requested_ms) return requested_ms;
  if (const char* env = std::getenv("DISTFUSE_TIMEOUT_MS")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<uint64_t>(v);
  }
  return kDefaultTimeoutMs;
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

std::string to_string(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> to_bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

struct PeerVerdict {
  bool p2p = false;    // every member reaches every other's GPU memory directly
  bool ll128 = false;  // and over NVLink between Hopper GPUs with SMs for the LL128 grid: LL128 lines allowed
};

// Every rank learns whether all members sit on one host and can reach each
// other's GPU memory directly, whether every pair is linked by NVLink (native peer
// atomics, which PCIe peers lack) between Hopper GPUs, and which GPU model they
// share. Two rounds through the group's store: identity (host, PCI bus id, SM count,
// GPU name), then each rank's verdict; the answer is the AND of verdicts, the same on
// every rank. `gpu_name`: the members' common GPU name, "mixed" if they differ;
// `sm_count`: the smallest SM count among them.
PeerVerdict exchange_p2p_verdict(c10d::ProcessGroup& pg, const std::string& prefix, int device,
                                 std::string& gpu_name, int& sm_count) {
  const int rank = pg.getRank();
  const int world = pg.getSize();
  auto store = pg.getStore();
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  char bus[64] = {0};
  C10_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus), device));
  cudaDeviceProp prop{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  store->set(prefix + "id/" + std::to_string(rank),
             to_bytes(std::string(host) + "|" + bus + "|" + std::to_string(prop.multiProcessorCount) + "|" +
                      prop.name));

  bool ok = true;
  // LL128 grids need their blocks resident together (comm/handle.h).
  bool nvlink = prop.major == 9 && ll128_grid_fits(prop.multiProcessorCount);
  gpu_name = prop.name;
  sm_count = prop.multiProcessorCount;
  for (int p = 0; p < world; ++p) {
    const std::string id = to_string(store->get(prefix + "id/" + std::to_string(p)));
    const size_t bar = id.find('|'), bar2 = id.find('|', bar + 1), bar3 = id.find('|', bar2 + 1);
    sm_count = std::min(sm_count, std::stoi(id.substr(bar2 + 1, bar3 - bar2 - 1)));
    if (id.substr(bar3 + 1) != gpu_name) gpu_name = "mixed";
    if (!ok) continue;
    if (id.substr(0, bar) != host) {
      ok = false;  // another host: no load/store access
      continue;
    }
    int peer_device = -1;
    if (cudaDeviceGetByPCIBusId(&peer_device, id.substr(bar + 1, bar2 - bar - 1).c_str()) != cudaSuccess) {
      (void)cudaGetLastError();
      ok = false;  // the peer's GPU is not visible to this process
      continue;
    }
    if (peer_device != device) {
      int can = 0;
      C10_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device, peer_device));
      ok = ok && can;
      int atomics = 0;
      if (can)
        C10_CUDA_CHECK(cudaDeviceGetP2PAttribute(&atomics, cudaDevP2PAttrNativeAtomicSupported, device, peer_device));
      nvlink = nvlink && atomics;
    } else if (p != rank) {
      nvlink = false;  // another rank on this GPU (time-shared): no NVLink between the two, so no LL128 lines
    }
  }
  store->set(prefix + "ok/" + std::to_string(rank), to_bytes(!ok ? "0" : nvlink ? "2" : "1"));
  PeerVerdict v{true, true};
  for (int p = 0; p < world; ++p) {
    const std::string peer = to_string(store->get(prefix + "ok/" + std::to_string(p)));
    v.p2p = v.p2p && peer != "0";
    v.ll128 = v.ll128 && peer == "2";  // "2" only where P2P holds too
  }
  return v;
}

}  // namespace

Workspace::Workspace(std::string group_name, size_t max_output_bytes, uint64_t timeout_ms)
    : group_name_(std::move(group_name)), max_output_bytes_(max_output_bytes), timeout_ms_(timeout_ms) {}

size_t Workspace::one_shot_capacity_bytes() const { return kOneShotCapacityBytes; }

void Workspace::allocate(const char* op) {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(group_name_);
  } catch (const std::exception&) {
    TORCH_CHECK(false, "distfuse.", op, ": unknown group_name '", group_name_,
                "': pass a torch.distributed ProcessGroup or its .group_name");
  }
  rank_ = pg->getRank();
  world_ = pg->getSize();
  device_ = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  TORCH_CHECK(world_ <= kMaxWorld, "distfuse.", op, ": group '", group_name_, "' has ", world_,
              " ranks; the fused kernels support at most ", kMaxWorld);

  const int generation = (*g_generation)[group_name_]++;
  const std::string prefix =
      "distfuse/" + group_name_ + "/" + std::to_string(generation) + "/";
  p2p_ = ll128_ = false;
  if (world_ > 1) {
    const PeerVerdict v = exchange_p2p_verdict(*pg, prefix, device_, gpu_name_, sm_count_);
    p2p_ = v.p2p;
    ll128_ = v.ll128;
  }
  if (!p2p_) return;

  tile_bytes_ = std::max<size_t>(tile_bytes_, tile_region_bytes_for_output(max_output_bytes_, world_));
  const WorkspaceLayout layout = make_layout(world_, tile_bytes_);
  buffer_ = c10d::symmetric_memory::empty_strided_p2p(
      {static_cast<int64_t>(layout.total_bytes)}, {1}, at::kByte, at::Device(at::kCUDA, device_),
      group_name_, std::nullopt);
  symm_ = c10d::symmetric_memory::rendezvous(buffer_, group_name_);
  TORCH_CHECK(symm_->get_world_size() == world_ && symm_->get_rank() == rank_,
              "distfuse: symmetric memory of group '", group_name_, "' reports rank ",
              symm_->get_rank(), " of ", symm_->get_world_size(), ", expected ", rank_, " of ",
              world_);
  const std::vector<void*> ptrs = symm_->get_buffer_ptrs();
  const size_t offset = symm_->get_offset();
  handle_ = CommHandle{};
  for (int p = 0; p < world_; ++p) handle_.peer_base[p] = static_cast<unsigned char*>(ptrs[p]) + offset;
  handle_.rank = rank_;
  handle_.world = world_;
  handle_.timeout_ns = timeout_ms_ * 1000000ull;
  handle_.layout = layout;

  // Counters, flags and LL lines start at zero (epoch 0 never appears).
  // The barrier keeps peers from writing into this buffer before it is cleared.
  auto stream = at::cuda::getCurrentCUDAStream(device_);
  C10_CUDA_CHECK(cudaMemsetAsync(handle_.peer_base[rank_], 0, layout.twoshot_offset, stream));
  symm_->barrier(0, timeout_ms_);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void Workspace::release() {
  if (!symm_) return;
  // Peers may still read this buffer (the tail of their last op, on any of their
  // streams): every rank first finishes all its own work, then all meet (the barrier runs
  // on the current stream only), then none frees before the barrier is done.
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  symm_->barrier(0, timeout_ms_);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  symm_.reset();
  buffer_ = at::Tensor();
  retired_symm_.clear();
  retired_buffers_.clear();
}

Workspace& Workspace::create(const std::string& group_name, size_t max_output_bytes,
                             uint64_t timeout_ms, const char* op) {
  TORCH_CHECK(!capturing(), "distfuse.init_workspace: cannot create the workspace of group '",
              group_name, "' during CUDA graph capture; call it before capturing");
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_workspaces->find(group_name);
  if (it != g_workspaces->end()) {
    c10::cuda::CUDAGuard guard(it->second->device_ >= 0 ? it->second->device_
                                                        : c10::cuda::current_device());
    it->second->release();
    g_workspaces->erase(it);
  }
  std::unique_ptr<Workspace> ws(
      new Workspace(group_name, max_output_bytes, timeout_from_env(timeout_ms)));
  ws->allocate(op);
  Workspace& ref = *ws;
  (*g_workspaces)[group_name] = std::move(ws);
  return ref;
}

Workspace& Workspace::get(const std::string& group_name, const char* op) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_workspaces->find(group_name);
    if (it != g_workspaces->end()) return *it->second;
  }
  TORCH_CHECK(!capturing(), "distfuse.", op, ": group '", group_name,
              "' has no workspace and one cannot be created during CUDA graph capture; call "
              "distfuse.init_workspace(group, max_bytes) on every rank before capturing");
  return create(group_name, 0, 0, op);
}

void Workspace::destroy(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_workspaces->find(group_name);
  if (it == g_workspaces->end()) return;
  if (it->second->device_ >= 0) {
    c10::cuda::CUDAGuard guard(it->second->device_);
    it->second->release();
  }
  g_workspaces->erase(it);
}

std::vector<int64_t> Workspace::info(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_workspaces->find(group_name);
  if (it == g_workspaces->end()) return {};
  const Workspace& w = *it->second;
  const WorkspaceLayout& l = w.handle_.layout;
  return {w.p2p_, w.world_, w.rank_, static_cast<int64_t>(l.total_bytes),
          w.p2p_ ? static_cast<int64_t>(kOneShotCapacityBytes) : 0,
          static_cast<int64_t>(l.twoshot_bytes), static_cast<int64_t>(l.tiles_bytes),
          static_cast<int64_t>(w.timeout_ms_),
          static_cast<int64_t>(l.tiles_bytes / tile_region_bytes_for_output(1, w.world_)), w.ll128_,
          w.sm_count_};
}

void* Workspace::gemm_scratch(size_t bytes, const char* op) {
  if (gemm_scratch_.defined() && size_t(gemm_scratch_.numel()) >= bytes)
    return gemm_scratch_.data_ptr();
  TORCH_CHECK(!capturing(), "distfuse.", op, ": the GEMM needs ", bytes,
              " bytes of split-K scratch, more than it had when capture began; run the op once "
              "with these shapes before capturing");
  constexpr size_t kGrain = 4ull << 20;
  const size_t grown = (bytes + kGrain - 1) / kGrain * kGrain;
  // CUDA graphs captured earlier keep the old buffer's address: it is retired, not
  // freed, until the workspace is released.
  if (gemm_scratch_.defined()) retired_buffers_.push_back(gemm_scratch_);
  gemm_scratch_ = at::zeros({static_cast<int64_t>(grown)},
                            at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_));
  return gemm_scratch_.data_ptr();
}

void Workspace::ensure_tile_bytes(size_t bytes, const char* op) {
  if (!p2p_ || bytes <= handle_.layout.tiles_bytes) return;
  const size_t per_output = tile_region_bytes_for_output(1, world_);
  TORCH_CHECK(!capturing(), "distfuse.", op, ": this call needs a tile region of ", bytes,
              " bytes but the workspace of group '", group_name_, "' has ",
              handle_.layout.tiles_bytes,
              "; it cannot grow during CUDA graph capture: call distfuse.init_workspace(group, "
              "max_bytes=", (bytes + per_output - 1) / per_output,
              ") (or more: the largest fused output, M x N x element size) on every rank before "
              "capturing");
  // Round up so that a sweep of growing shapes re-creates rarely; identical on every rank.
  constexpr size_t kGrain = 64ull << 20;
  const size_t grown = (bytes + kGrain - 1) / kGrain * kGrain;
  std::lock_guard<std::mutex> lock(g_mutex);
  // CUDA graphs captured earlier keep using the old buffer (its own flags and
  // epochs, identical on every rank): it is retired, not freed, until release().
  retired_buffers_.push_back(buffer_);
  retired_symm_.push_back(symm_);
  tile_bytes_ = grown;
  allocate(op);
}

}  // namespace distfuse::comm
