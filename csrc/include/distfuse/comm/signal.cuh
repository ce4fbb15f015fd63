// Flags between GPUs: release stores, acquire loads and bounded waits.
//
// Memory ordering of each helper (PTX memory model, scope .sys because peers
// are other GPUs reached over NVLink):
//  - store_release_sys(p, v): every write this thread made before it, and every
//    write another thread of the block made before a __syncthreads() that this
//    thread passed, is visible to any thread that observes v with an acquire.
//  - load_acquire_sys(p): writes released before the observed value are visible
//    to this thread afterwards, and to the block after a following __syncthreads().
//  - wait_flag_reached(...): spins with acquire loads until the counter *p has
//    reached `epoch` (wrap-safe *p >= epoch); traps with a message naming the op,
//    the tile (or block) and the peer after timeout_ns. poll_flag_reached(...): the
//    same wait, returning false at the timeout instead (no call in its code).
//  - ll_store / ll_load: 16-byte "low latency" lines {d0, flag, d1, flag}. A line
//    is written by one vector store and is valid when both flags equal the
//    epoch, so data and flag arrive together and no fence is needed.
//  - ll128_store / ll128_load_warp: 128-byte lines of 15 payload words and a flag
//    word, each line written by one warp store instruction of 8 lanes (16 bytes
//    each, the flag in the 8th lane's upper half) and read the same way. A line
//    read whose flag equals the epoch is taken as whole: this relies on NVLink
//    delivering a warp's 128-byte aligned store as one unit, which holds between
//    Hopper GPUs over NVLink (NCCL's LL128 protocol relies on it there) and is not
//    promised elsewhere, so the workspace enables these lines only on such groups.
//  - store_epoch_when_last(...): the last CTA of a call publishes its epoch to the
//    next call on the stream (plain stores; the kernel boundary orders them).
//  - enter_call(...): a handshake at the start of a kernel that writes into peers'
//    workspace: no thread of the block goes on before every peer has entered the
//    same call, i.e. finished every access of its previous calls (its streams of
//    that call were joined before this one was launched).
#pragma once

#include <cstdint>
#include <cstdio>

#include "distfuse/comm/handle.h"
#include "distfuse/params.h"

namespace distfuse {

constexpr uint64_t kDefaultTimeoutNs = 60ull * 1000 * 1000 * 1000;  // 60 s
// A wait's bound: the call's timeout, or the default where it has none (0).
__host__ __device__ constexpr uint64_t timeout_bound_ns(uint64_t timeout_ns) {
  return timeout_ns ? timeout_ns : kDefaultTimeoutNs;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// *p += v with release semantics at system scope (a counter flag that several writers raise).
__device__ __forceinline__ void add_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t load_relaxed_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The next epoch after `e`. 0 is the value of fresh memory and never an epoch; at
// the wrap the sequence jumps from 0xffffffff to 2 so that parity keeps alternating
// (double-buffered slots are chosen by epoch parity).
__device__ __forceinline__ uint32_t next_epoch(uint32_t e) { return e + 1 == 0 ? 2 : e + 1; }

[[noreturn]] __device__ __forceinline__ void timeout_trap(int op, const char* what, int index,
                                                          int peer, uint32_t expected,
                                                          uint32_t seen) {
  printf(
      "distfuse: %s timed out waiting for %s %d from peer rank %d (expected epoch %u, saw %u); "
      "a rank did not call the op, or called it with other arguments\n",
      op_name(op), what, index, peer, expected, seen);
  __trap();
  __builtin_unreachable();
}

// Wrap-safe "counter `value` has reached `epoch`".
__device__ __forceinline__ bool epoch_reached(uint32_t value, uint32_t epoch) {
  return static_cast<int32_t>(value - epoch) >= 0;
}

// Spin until *p has reached `epoch` (true) or timeout_ns passed (false, *seen = the
// last value read). No function call: kernels that issue wgmma may use it (ptxas
// serializes their wgmma pipeline around any call, printf's included). The clock is
// read only every 64 polls.
__device__ __forceinline__ bool poll_flag_reached(const uint32_t* p, uint32_t epoch, uint64_t timeout_ns,
                                                  uint32_t* seen) {
  uint32_t v = load_acquire_sys(p);
  if (epoch_reached(v, epoch)) return true;
  const uint64_t start = global_timer_ns();
  const uint64_t bound = timeout_bound_ns(timeout_ns);
  for (uint32_t spins = 1;; ++spins) {
    v = load_acquire_sys(p);
    if (epoch_reached(v, epoch)) return true;
    if ((spins & 63u) == 0 && global_timer_ns() - start > bound) {
      *seen = v;
      return false;
    }
  }
}

// Spin until *p has reached `epoch`; after timeout_ns, trap with a message.
__device__ __forceinline__ void wait_flag_reached(const uint32_t* p, uint32_t epoch,
                                                  uint64_t timeout_ns, int op, const char* what,
                                                  int index, int peer) {
  uint32_t seen;
  if (!poll_flag_reached(p, epoch, timeout_ns, &seen)) timeout_trap(op, what, index, peer, epoch, seen);
}

struct LLLine {
  uint32_t d0, f0, d1, f1;
};

__device__ __forceinline__ void ll_store(LLLine* p, uint32_t d0, uint32_t d1, uint32_t flag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(d0), "r"(flag),
               "r"(d1), "r"(flag)
               : "memory");
}

// Spin until the line carries `flag` in both halves; returns its data.
__device__ __forceinline__ uint2 ll_load(const LLLine* p, uint32_t flag, uint64_t timeout_ns,
                                         int op, int block, int peer) {
  uint32_t d0, f0, d1, f1;
  uint64_t start = 0;
  const uint64_t bound = timeout_bound_ns(timeout_ns);
  for (uint32_t spins = 0;; ++spins) {
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(d0), "=r"(f0), "=r"(d1), "=r"(f1)
                 : "l"(p)
                 : "memory");
    if (f0 == flag && f1 == flag) return make_uint2(d0, d1);
    if (spins == 0) start = global_timer_ns();
    else if ((spins & 63u) == 0 && global_timer_ns() - start > bound)
      timeout_trap(op, "block", block, peer, flag, f0 != flag ? f0 : f1);
  }
}

__device__ __forceinline__ void ll128_store(void* p, uint64_t w0, uint64_t w1) {
  asm volatile("st.volatile.global.v2.u64 [%0], {%1, %2};" ::"l"(p), "l"(w0), "l"(w1) : "memory");
}

// Every lane of the warp calls this together (the vote spans the full warp). A lane
// with `valid` reads its 16 bytes at p; the line's flag lane (the 8th of its group)
// checks the upper word against `flag`, and the warp rereads until every flag lane
// has seen its flag, so each lane returns data read together with a valid flag.
__device__ __forceinline__ ulonglong2 ll128_load_warp(const void* p, bool valid, bool flag_lane, uint64_t flag,
                                                      uint64_t timeout_ns, int op, int block, int peer) {
  ulonglong2 v = make_ulonglong2(0, 0);
  uint64_t start = 0;
  const uint64_t bound = timeout_bound_ns(timeout_ns);
  for (uint32_t spins = 0;; ++spins) {
    if (valid)
      asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(v.x), "=l"(v.y) : "l"(p) : "memory");
    const bool stale = valid && flag_lane && v.y != flag;
    if (!__any_sync(0xffffffffu, stale)) return v;
    if (spins == 0) start = global_timer_ns();
    else if ((spins & 63u) == 0 && global_timer_ns() - start > bound && stale)
      timeout_trap(op, "block", block, peer, uint32_t(flag), uint32_t(v.y));
  }
}

// End of a call whose CTAs all read the call epoch from *value at their start: the
// last CTA of the grid to get here stores `epoch` (and resets the arrival count), so
// that the next call, on the same stream, reads it.
__device__ __forceinline__ void store_epoch_when_last(uint32_t* value, uint32_t* arrived, uint32_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(arrived, 1u) == gridDim.x - 1) {
      *arrived = 0;
      *value = epoch;
    }
  }
}

// Block 0 posts `epoch` to every peer's flags(channel)[slot + rank]; every block
// waits for flags(channel)[slot + src] of every peer src to reach it.
__device__ __forceinline__ void enter_call(const CommHandle& c, int channel, int64_t slot, uint32_t epoch,
                                           int op) {
  const int src = int(threadIdx.x);
  if (src < c.world && src != c.rank) {
    if (blockIdx.x == 0) store_release_sys(c.flags(src, channel) + slot + c.rank, epoch);
    wait_flag_reached(c.flags(c.rank, channel) + slot + src, epoch, c.timeout_ns, op, "call entry",
                      int(blockIdx.x), src);
  }
  __syncthreads();
}

}  // namespace distfuse
