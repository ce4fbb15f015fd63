// Symmetric workspace of one process group (host side).
//
// One Workspace per group_name, created collectively on first use or by
// distfuse.init_workspace. It owns one PyTorch SymmetricMemory allocation per
// rank, laid out as described in distfuse/comm/handle.h, and hands kernels a
// CommHandle (peer base pointers, rank, world, layout, wait bound).
//
// Groups whose members cannot all reach each other's memory directly (ranks on
// several hosts, GPUs without peer access) get a Workspace with p2p() == false
// and no allocation: their ops take the NCCL path. The decision is exchanged
// through the group's store, so every rank takes the same one.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/symm_mem/SymmetricMemory.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "distfuse/comm/handle.h"

namespace distfuse::comm {

class Workspace {
 public:
  // The workspace of `group_name` on the current device, created collectively
  // when missing. Creation during CUDA-graph capture is an error that says how
  // to pre-size (`op` names the calling op in that message).
  static Workspace& get(const std::string& group_name, const char* op);
  // (Re-)creates the workspace with a tile region for fused GEMM outputs of up to
  // `max_output_bytes` (M·N·element size); collective. The buffers it replaces are
  // freed, or kept until destroy() where CUDA graphs captured on them may use them.
  static Workspace& create(const std::string& group_name, size_t max_output_bytes,
                           uint64_t timeout_ms, const char* op = "init_workspace");
  // Frees the workspace, and the buffers kept for CUDA graphs (which must not be
  // replayed after it), after every rank's pending work finished; collective.
  static void destroy(const std::string& group_name);
  // {p2p, world, rank, total_bytes, one_shot_capacity, two_shot_bytes, tile_bytes, timeout_ms,
  //  max_output_bytes (the largest fused GEMM output the tile region holds), ll128, sm_count,
  //  retired_bytes (buffers replaced by growths and kept for CUDA graphs captured before)};
  // empty when the group has no workspace.
  static std::vector<int64_t> info(const std::string& group_name);

  // Grows the tile region to at least `bytes` (collective: every rank calls it
  // with the same size because shapes are identical). Inside CUDA-graph capture
  // growth is impossible and raises an error naming the size to pre-allocate.
  // The old buffer is kept until destroy() where a CUDA graph captured since it was
  // made may use it, else freed once every rank's work on it is done. When a rank
  // cannot allocate the new one, every rank raises and keeps the old region.
  void ensure_tile_bytes(size_t bytes, const char* op);

  // A zero-filled local device buffer of at least `bytes` for the GEMM's split-K
  // counters and partials (kernels leave the counters at zero). Grows outside
  // CUDA-graph capture only; inside capture, needing more is an error. The old buffer
  // is kept or freed as in ensure_tile_bytes.
  void* gemm_scratch(size_t bytes, const char* op);

  bool p2p() const { return p2p_; }
  // Every pair of members linked by NVLink between Hopper GPUs (no two members on one
  // GPU) with SMs enough for an LL128 grid (comm/handle.h): the LL128 lines of
  // distfuse/comm/signal.cuh are allowed (the same answer on every rank).
  bool ll128() const { return ll128_; }
  int rank() const { return rank_; }
  int world() const { return world_; }
  int device() const { return device_; }
  // The GPU name every member shares ("mixed" if they differ; empty without P2P).
  const std::string& gpu_name() const { return gpu_name_; }
  // The smallest SM count among the members (this GPU's without P2P): persistent
  // grids whose CTAs pair up with the peers' CTAs are sized from it on every rank.
  int sm_count() const { return sm_count_; }
  const CommHandle& handle() const { return handle_; }
  size_t one_shot_capacity_bytes() const;

 private:
  Workspace(std::string group_name, size_t max_output_bytes, uint64_t timeout_ms);
  static Workspace& create_locked(const std::string& group_name, size_t max_output_bytes,
                                  uint64_t timeout_ms, const char* op);
  // Collective: the P2P verdict, then a buffer with a tile region of at least
  // `tile_bytes` (and of what max_output_bytes_ needs). Either every member is assigned
  // or, on an error, none (the same error on every rank where a rank cannot allocate).
  void allocate(const char* op, size_t tile_bytes);
  // Frees the buffers, the group's retired ones too, once every rank's work is done.
  void release();

  std::string group_name_;
  size_t max_output_bytes_;  // as asked by init_workspace
  uint64_t timeout_ms_;
  bool p2p_ = false;
  bool ll128_ = false;
  int rank_ = 0;
  int world_ = 1;
  int device_ = -1;
  std::string gpu_name_;
  int sm_count_ = 0;
  at::Tensor buffer_;
  at::Tensor gemm_scratch_;
  c10::intrusive_ptr<c10d::symmetric_memory::SymmetricMemory> symm_;
  // Whether a CUDA graph was captured with an op of this group since the tile buffer
  // (buffer_, symm_) or the split-K scratch was made: such graphs keep their addresses.
  bool tiles_in_graphs_ = false;
  bool scratch_in_graphs_ = false;
  CommHandle handle_{};
};

}  // namespace distfuse::comm
