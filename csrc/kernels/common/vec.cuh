// Element types and 16-byte vectors shared by the communication kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "distfuse/params.h"

namespace distfuse {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// `kBytes` bytes of elements of T held in 32-bit words (kBytes = 8 or 16).
template <typename T, int kBytes>
struct Pack {
  static constexpr int kWords = kBytes / 4;
  static constexpr int kElems = kBytes / int(sizeof(T));
  uint32_t w[kWords];

  __device__ __forceinline__ T& elem(int i) { return reinterpret_cast<T*>(w)[i]; }
  __device__ __forceinline__ T elem(int i) const { return reinterpret_cast<const T*>(w)[i]; }
};

// acc[i] += pack[i] in fp32.
template <typename T, int kBytes>
__device__ __forceinline__ void accumulate(float (&acc)[Pack<T, kBytes>::kElems],
                                           const Pack<T, kBytes>& p) {
#pragma unroll
  for (int i = 0; i < Pack<T, kBytes>::kElems; ++i) acc[i] += to_float(p.elem(i));
}

template <typename T, int kBytes>
__device__ __forceinline__ Pack<T, kBytes> round_pack(const float (&acc)[Pack<T, kBytes>::kElems]) {
  Pack<T, kBytes> p;
#pragma unroll
  for (int i = 0; i < Pack<T, kBytes>::kElems; ++i) p.elem(i) = from_float<T>(acc[i]);
  return p;
}

__device__ __forceinline__ uint4 load_cg(const void* p) {
  return __ldcg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ uint4 load_plain(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void store_plain(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

__device__ __forceinline__ uint4 as_uint4(const Pack<float, 16>& p) {
  return make_uint4(p.w[0], p.w[1], p.w[2], p.w[3]);
}
template <typename T>
__device__ __forceinline__ Pack<T, 16> to_pack(uint4 v) {
  Pack<T, 16> p;
  p.w[0] = v.x; p.w[1] = v.y; p.w[2] = v.z; p.w[3] = v.w;
  return p;
}
template <typename T>
__device__ __forceinline__ uint4 from_pack(const Pack<T, 16>& p) {
  return make_uint4(p.w[0], p.w[1], p.w[2], p.w[3]);
}
// An 8-byte pack as the 64-bit word an LL128 line carries, and back.
template <typename T>
__device__ __forceinline__ uint64_t word_bits(const Pack<T, 8>& w) {
  return uint64_t(w.w[0]) | (uint64_t(w.w[1]) << 32);
}
template <typename T>
__device__ __forceinline__ Pack<T, 8> word_from_bits(uint64_t b) {
  Pack<T, 8> w;
  w.w[0] = uint32_t(b);
  w.w[1] = uint32_t(b >> 32);
  return w;
}

// Loads `kBytes` bytes at element offset `idx` of `base`, reading only the
// `n - idx` elements that exist when the pack straddles the end (rest zero).
template <typename T, int kBytes>
__device__ __forceinline__ Pack<T, kBytes> load_pack_tail(const T* base, int64_t idx, int64_t n) {
  Pack<T, kBytes> p;
#pragma unroll
  for (int i = 0; i < Pack<T, kBytes>::kWords; ++i) p.w[i] = 0;
#pragma unroll
  for (int i = 0; i < Pack<T, kBytes>::kElems; ++i)
    if (idx + i < n) p.elem(i) = base[idx + i];
  return p;
}

template <typename T, int kBytes>
__device__ __forceinline__ void store_pack_tail(T* base, int64_t idx, int64_t n,
                                                const Pack<T, kBytes>& p) {
#pragma unroll
  for (int i = 0; i < Pack<T, kBytes>::kElems; ++i)
    if (idx + i < n) base[idx + i] = p.elem(i);
}

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <>
struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };
template <>
struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
inline auto visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32:
    default: return f(float{});
  }
}

// Calls f(std::integral_constant<int, W>{}) for W = world (2..8).
template <typename F>
inline auto visit_world(int world, F&& f) {
  switch (world) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// f(T{}, std::integral_constant<int, W>{}) for the 16-bit dtypes (bf16, fp16), the
// ones the fused GEMM ops take; cudaErrorInvalidValue for fp32.
template <typename F>
inline cudaError_t visit_half_dtype_and_world(DType dtype, int world, F&& f) {
  return visit_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      return visit_world(world, [&](auto w) { return f(T{}, w); });
    }
  });
}

}  // namespace distfuse
