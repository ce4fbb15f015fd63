#include "ops/cuda/side_streams.h"

#include "ops/control.h"  // side_streams_made

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

namespace distfuse::ops {
namespace {

constexpr int kMaxDevices = 64;
constexpr int kSlots = kMaxDevices * kSideStreamsPerDevice;

using Spares = std::vector<std::unique_ptr<SideStream>>;

std::mutex g_spares_mutex;
// Streams of ended threads, per slot (device, index). Never destroyed: the process may end
// while kernels still run on them.
auto* g_spares = new Spares[kSlots];
std::atomic<int64_t> g_made{0};

// A thread's streams, handed back to g_spares when the thread ends. The handback makes
// no CUDA call (the thread may end while another captures a graph, or after a trap).
struct ThreadStreams {
  std::unique_ptr<SideStream> slots[kSlots];
  ~ThreadStreams() {
    std::lock_guard<std::mutex> lock(g_spares_mutex);
    for (int i = 0; i < kSlots; ++i)
      if (slots[i]) g_spares[i].push_back(std::move(slots[i]));
  }
};

std::unique_ptr<SideStream> make_side_stream(int device) {
  c10::cuda::CUDAGuard guard(device);
  int lowest = 0, highest = 0;
  C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lowest, &highest));
  cudaStream_t raw = nullptr;
  C10_CUDA_CHECK(cudaStreamCreateWithPriority(&raw, cudaStreamNonBlocking, highest));
  auto s = std::make_unique<SideStream>(
      SideStream{c10::cuda::getStreamFromExternal(raw, static_cast<c10::DeviceIndex>(device)), nullptr, nullptr});
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&s->join, cudaEventDisableTiming));
  ++g_made;
  return s;
}

}  // namespace

void SideStream::fork_from(cudaStream_t main) {
  C10_CUDA_CHECK(cudaEventRecord(fork, main));
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream, fork, 0));
}

void SideStream::join_into(cudaStream_t main) {
  C10_CUDA_CHECK(cudaEventRecord(join, stream));
  C10_CUDA_CHECK(cudaStreamWaitEvent(main, join, 0));
}

SideStream& side_stream(int device, int index) {
  TORCH_INTERNAL_ASSERT(device >= 0 && device < kMaxDevices && index >= 0 && index < kSideStreamsPerDevice);
  thread_local ThreadStreams mine;
  const int i = device * kSideStreamsPerDevice + index;
  std::unique_ptr<SideStream>& slot = mine.slots[i];
  if (!slot) {
    {
      std::lock_guard<std::mutex> lock(g_spares_mutex);
      if (!g_spares[i].empty()) {
        slot = std::move(g_spares[i].back());
        g_spares[i].pop_back();
      }
    }
    // An ended thread's work on it stays ahead of this thread's: same stream, in order.
    if (!slot) slot = make_side_stream(device);
  }
  return *slot;
}

int64_t side_streams_made() { return g_made.load(); }

}  // namespace distfuse::ops
