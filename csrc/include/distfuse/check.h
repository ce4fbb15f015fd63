// Error macros usable from torch-free code (kernels, communication layer).
//
// DF_CHECK throws std::runtime_error with file, line and a streamed message; the
// ATen glue converts it to a Python RuntimeError. DF_CUDA_CHECK checks a CUDA
// runtime call; DF_CUDA_CHECK_LAUNCH checks the last launch on this thread.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace distfuse {

namespace detail {
inline void stream_all(std::ostringstream&) {}
template <typename T, typename... Rest>
inline void stream_all(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  stream_all(os, rest...);
}
}  // namespace detail

template <typename... Args>
[[noreturn]] inline void throw_error(const char* file, int line, const Args&... args) {
  std::ostringstream os;
  detail::stream_all(os, args...);
  os << " (" << file << ":" << line << ")";
  throw std::runtime_error(os.str());
}

}  // namespace distfuse

#define DF_CHECK(cond, ...)                                          \
  do {                                                               \
    if (!(cond)) ::distfuse::throw_error(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

#ifdef __CUDACC__
#define DF_HAS_CUDA_RUNTIME 1
#endif

#if defined(DF_HAS_CUDA_RUNTIME) || defined(DISTFUSE_WITH_CUDA)
#include <cuda_runtime_api.h>
#define DF_CUDA_CHECK(call)                                                        \
  do {                                                                             \
    cudaError_t df_err_ = (call);                                                  \
    if (df_err_ != cudaSuccess)                                                    \
      ::distfuse::throw_error(__FILE__, __LINE__, "CUDA error ", cudaGetErrorName(df_err_), \
                              " (", cudaGetErrorString(df_err_), ") in ", #call);  \
  } while (0)
#define DF_CUDA_CHECK_LAUNCH() DF_CUDA_CHECK(cudaGetLastError())
#endif
