#include "comm/workspace.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace distfuse::comm {
namespace {

constexpr uint64_t kDefaultTimeoutMs = 60000;

// Held across creations and growths, rendezvous included, for every group at once:
// PyTorch's symmetric-memory rendezvous numbers its store exchanges with one counter per
// process, not per group, so two groups' rendezvous must never interleave in a process
// (and must come in the same order on every rank, which README asks of the caller).
std::mutex g_mutex;
// Never destroyed: freeing peer-mapped memory during interpreter teardown is unsafe.
auto* g_workspaces = new std::map<std::string, std::unique_ptr<Workspace>>();
// How often each group's workspace was created; part of the store keys so that a
// re-created workspace never reads a stale exchange.
auto* g_generation = new std::map<std::string, int>();

// Buffers of a group that a growth or a re-creation replaced while CUDA graphs captured
// before may still use them (their kernels keep the old addresses): kept until
// destroy_workspace. A buffer no graph may use is freed instead, so a sweep of growing
// shapes in eager mode holds one tile region, not every size it passed.
struct RetiredBuffers {
  std::vector<at::Tensor> buffers;
  std::vector<c10::intrusive_ptr<c10d::symmetric_memory::SymmetricMemory>> symm;
  // A buffer, with its symmetric-memory handle where it has one (the tile region).
  void keep(at::Tensor buffer, c10::intrusive_ptr<c10d::symmetric_memory::SymmetricMemory> handle = {}) {
    buffers.push_back(std::move(buffer));
    if (handle) symm.push_back(std::move(handle));
  }
  int64_t bytes() const {
    int64_t total = 0;
    for (const at::Tensor& b : buffers) total += static_cast<int64_t>(b.nbytes());
    return total;
  }
};
auto* g_retired = new std::map<std::string, RetiredBuffers>();

// Every rank finishes all its work (on any stream), then all meet on `symm`'s barrier
// (collective): afterwards no kernel of any rank reads or writes the group's buffers.
void wait_for_every_rank(c10d::symmetric_memory::SymmetricMemory& symm, uint64_t timeout_ms) {
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  symm.barrier(0, timeout_ms);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
}

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

// This machine as the members compare it: the host name and the kernel's boot id, so that
// two hosts given the same name (containers started with one --hostname) still differ,
// while containers on one host (one kernel) match.
std::string host_identity() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) host[0] = 0;
  std::string boot_id;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot_id;
  return std::string(host) + "/" + boot_id;
}

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
  const std::string host = host_identity();
  char bus[64] = {0};
  C10_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus), device));
  cudaDeviceProp prop{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  store->set(prefix + "id/" + std::to_string(rank),
             to_bytes(host + "|" + bus + "|" + std::to_string(prop.multiProcessorCount) + "|" +
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

// Whether every rank allocated its buffer: each one reports through the store (an empty
// value, or why its allocation failed) and reads every report, so that a rank that ran
// out of memory makes all of them raise the same error instead of leaving its peers in
// the rendezvous until the store times out. Returns "" or "rank r: reason".
std::string exchange_allocation_failures(c10d::ProcessGroup& pg, const std::string& prefix,
                                         const std::string& own_failure) {
  auto store = pg.getStore();
  store->set(prefix + "alloc/" + std::to_string(pg.getRank()), to_bytes(own_failure));
  for (int p = 0; p < pg.getSize(); ++p) {
    const std::string failure = to_string(store->get(prefix + "alloc/" + std::to_string(p)));
    if (!failure.empty()) return "rank " + std::to_string(p) + ": " + failure;
  }
  return "";
}

// The first line of an exception's message (c10 errors append a C++ backtrace).
std::string first_line(const char* what) {
  const std::string s(what);
  return s.substr(0, s.find('\n'));
}

}  // namespace

Workspace::Workspace(std::string group_name, size_t max_output_bytes, uint64_t timeout_ms)
    : group_name_(std::move(group_name)), max_output_bytes_(max_output_bytes), timeout_ms_(timeout_ms) {}

size_t Workspace::one_shot_capacity_bytes() const { return kOneShotCapacityBytes; }

void Workspace::allocate(const char* op, size_t tile_bytes) {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(group_name_);
  } catch (const std::exception&) {
    TORCH_CHECK(false, "distfuse.", op, ": unknown group_name '", group_name_,
                "': pass a torch.distributed ProcessGroup or its .group_name");
  }
  // Everything is computed into locals and assigned at the end: a failure on the way
  // leaves this workspace as it was (a failed growth keeps the old buffer usable).
  const int rank = pg->getRank();
  const int world = pg->getSize();
  const int device = c10::cuda::current_device();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(world <= kMaxWorld, "distfuse.", op, ": group '", group_name_, "' has ", world,
              " ranks; the fused kernels support at most ", kMaxWorld);

  const int generation = (*g_generation)[group_name_]++;
  const std::string prefix =
      "distfuse/" + group_name_ + "/" + std::to_string(generation) + "/";
  PeerVerdict verdict;
  std::string gpu_name = gpu_name_;
  if (world > 1) verdict = exchange_p2p_verdict(*pg, prefix, device, gpu_name, sm_count);
  auto commit_identity = [&] {
    rank_ = rank;
    world_ = world;
    device_ = device;
    sm_count_ = sm_count;
    gpu_name_ = gpu_name;
    p2p_ = verdict.p2p;
    ll128_ = verdict.ll128;
  };
  if (!verdict.p2p) {
    commit_identity();
    return;
  }

  tile_bytes = std::max<size_t>(tile_bytes, tile_region_bytes_for_output(max_output_bytes_, world));
  const WorkspaceLayout layout = make_layout(world, tile_bytes);
  at::Tensor buffer;
  std::string failure;
  try {
    buffer = c10d::symmetric_memory::empty_strided_p2p(
        {static_cast<int64_t>(layout.total_bytes)}, {1}, at::kByte, at::Device(at::kCUDA, device),
        group_name_, std::nullopt);
  } catch (const std::exception& e) {
    failure = first_line(e.what());
    if (failure.empty()) failure = "allocation failed";
  }
  failure = exchange_allocation_failures(*pg, prefix, failure);
  TORCH_CHECK(failure.empty(), "distfuse.", op, ": the workspace of group '", group_name_, "' needs ",
              layout.total_bytes, " bytes on every rank (a tile region of ", tile_bytes,
              " bytes) and could not be allocated on ", failure,
              "; no rank changed its workspace. Free GPU memory, or use smaller fused outputs "
              "(the tile region holds ", 1 + 2 * world, " x the largest M x N x element size)");
  auto symm = c10d::symmetric_memory::rendezvous(buffer, group_name_);
  TORCH_CHECK(symm->get_world_size() == world && symm->get_rank() == rank,
              "distfuse: symmetric memory of group '", group_name_, "' reports rank ",
              symm->get_rank(), " of ", symm->get_world_size(), ", expected ", rank, " of ", world);
  const std::vector<void*> ptrs = symm->get_buffer_ptrs();
  const size_t offset = symm->get_offset();
  CommHandle handle{};
  for (int p = 0; p < world; ++p) handle.peer_base[p] = static_cast<unsigned char*>(ptrs[p]) + offset;
  handle.rank = rank;
  handle.world = world;
  handle.timeout_ns = timeout_ms_ * 1000000ull;
  handle.layout = layout;

  // Counters, flags and LL lines start at zero (epoch 0 never appears).
  // The barrier keeps peers from writing into this buffer before it is cleared.
  auto stream = at::cuda::getCurrentCUDAStream(device);
  C10_CUDA_CHECK(cudaMemsetAsync(handle.peer_base[rank], 0, layout.twoshot_offset, stream));
  symm->barrier(0, timeout_ms_);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));

  commit_identity();
  buffer_ = std::move(buffer);
  symm_ = std::move(symm);
  handle_ = handle;
}

void Workspace::release() {
  if (!symm_) return;
  // Peers may still read this buffer (the tail of their last op, on any of their
  // streams): none frees before every rank's work is done.
  wait_for_every_rank(*symm_, timeout_ms_);
  symm_.reset();
  buffer_ = at::Tensor();
  gemm_scratch_ = at::Tensor();
  g_retired->erase(group_name_);
}

Workspace& Workspace::create(const std::string& group_name, size_t max_output_bytes,
                             uint64_t timeout_ms, const char* op) {
  TORCH_CHECK(!capturing(), "distfuse.init_workspace: cannot create the workspace of group '",
              group_name, "' during CUDA graph capture; call it before capturing");
  std::lock_guard<std::mutex> lock(g_mutex);
  return create_locked(group_name, max_output_bytes, timeout_ms, op);
}

Workspace& Workspace::create_locked(const std::string& group_name, size_t max_output_bytes,
                                    uint64_t timeout_ms, const char* op) {
  auto it = g_workspaces->find(group_name);
  if (it != g_workspaces->end()) {
    // The old buffers are freed once every rank's work is done, except those CUDA graphs
    // captured on them may use: those join the group's retired buffers.
    std::unique_ptr<Workspace> previous = std::move(it->second);
    g_workspaces->erase(it);
    if (previous->symm_) {
      c10::cuda::CUDAGuard guard(previous->device_);
      wait_for_every_rank(*previous->symm_, previous->timeout_ms_);
      RetiredBuffers& retired = (*g_retired)[group_name];
      if (previous->tiles_in_graphs_) retired.keep(previous->buffer_, previous->symm_);
      if (previous->scratch_in_graphs_ && previous->gemm_scratch_.defined()) retired.keep(previous->gemm_scratch_);
    }
  }
  std::unique_ptr<Workspace> ws(
      new Workspace(group_name, max_output_bytes, timeout_from_env(timeout_ms)));
  ws->allocate(op, 0);
  Workspace& ref = *ws;
  (*g_workspaces)[group_name] = std::move(ws);
  return ref;
}

Workspace& Workspace::get(const std::string& group_name, const char* op) {
  // One lock over the lookup and the creation: two threads of a rank that both find no
  // workspace must not both create one (the second would release the first's).
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_workspaces->find(group_name);
  if (it != g_workspaces->end()) {
    // The op's kernels are being captured into a graph that keeps these addresses.
    if (capturing()) it->second->tiles_in_graphs_ = it->second->scratch_in_graphs_ = true;
    return *it->second;
  }
  TORCH_CHECK(!capturing(), "distfuse.", op, ": group '", group_name,
              "' has no workspace and one cannot be created during CUDA graph capture; call "
              "distfuse.init_workspace(group, max_bytes) on every rank before capturing");
  return create_locked(group_name, 0, 0, op);
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
          w.sm_count_, g_retired->count(group_name) ? g_retired->at(group_name).bytes() : 0};
}

void* Workspace::gemm_scratch(size_t bytes, const char* op) {
  if (gemm_scratch_.defined() && size_t(gemm_scratch_.numel()) >= bytes)
    return gemm_scratch_.data_ptr();
  TORCH_CHECK(!capturing(), "distfuse.", op, ": the GEMM needs ", bytes,
              " bytes of split-K scratch, more than it had when capture began; run the op once "
              "with these shapes before capturing");
  constexpr size_t kGrain = 4ull << 20;
  const size_t grown = (bytes + kGrain - 1) / kGrain * kGrain;
  // CUDA graphs captured on the old buffer keep its address: it is retired, not freed.
  // Else it is freed once this rank's work is done (only this rank's kernels use it).
  if (gemm_scratch_.defined()) {
    if (scratch_in_graphs_) {
      (*g_retired)[group_name_].keep(gemm_scratch_);
    } else {
      C10_CUDA_CHECK(cudaDeviceSynchronize());
    }
    gemm_scratch_ = at::Tensor();
  }
  gemm_scratch_ = at::zeros({static_cast<int64_t>(grown)},
                            at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_));
  scratch_in_graphs_ = false;
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
  if (bytes <= handle_.layout.tiles_bytes) return;  // another thread of this rank grew it
  // CUDA graphs captured on the old buffer keep using it (its own flags and epochs,
  // identical on every rank): it is retired, not freed, until destroy_workspace. Else it
  // is freed once every rank's work on it is done. A growth that fails (allocate raises
  // the same error on every rank) leaves the workspace as it was, so calls that fit the
  // old region still run.
  at::Tensor old_buffer = buffer_;
  auto old_symm = symm_;
  allocate(op, grown);
  wait_for_every_rank(*old_symm, timeout_ms_);
  if (tiles_in_graphs_) (*g_retired)[group_name_].keep(std::move(old_buffer), std::move(old_symm));
  tiles_in_graphs_ = false;
}

}  // namespace distfuse::comm
