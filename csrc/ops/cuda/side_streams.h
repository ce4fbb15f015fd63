// Side streams of the fused schedules (host side).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace distfuse::ops {

// A high-priority stream with a fork/join event pair, for work that runs beside the
// current stream: index 0 for the tile consumers and the all-reduces of the chunked and
// (captured) sequential schedules, 0 and 1 for the copy-engine schedule.
struct SideStream {
  c10::cuda::CUDAStream stream;
  cudaEvent_t fork;
  cudaEvent_t join;

  // The side stream's next work waits for what `main` has queued so far.
  void fork_from(cudaStream_t main);
  // `main`'s next work waits for what the side stream has queued so far.
  void join_into(cudaStream_t main);
};

constexpr int kSideStreamsPerDevice = 2;

// The calling host thread's side stream `index` on `device`. Each thread has its own, so
// that two threads' forks and joins never interleave on one event. They are made here,
// not taken from PyTorch's pool, so that no other work queues in front of kernels that
// wait on it; a thread that ends hands its streams back, and later threads take them
// before any is made, so a program that starts many short-lived threads holds as many
// streams as it ran threads at once.
SideStream& side_stream(int device, int index = 0);

}  // namespace distfuse::ops
