// Kernel launches as programmatic dependents (PDL), shared by the kernels that use them.
#pragma once

#include <cuda_runtime.h>

namespace distfuse {

// Launched as a programmatic dependent (PDL), a kernel may start while the
// previous kernel in the stream is still running; it waits here, before touching
// memory, until that kernel finished and its writes are visible. Without PDL
// this returns at once.
__device__ __forceinline__ void wait_for_previous_kernel() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// <<<grid, block, smem_bytes, stream>>>, optionally as a programmatic dependent launch.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), int grid, int block, int smem_bytes, cudaStream_t stream,
                          bool dependent, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace distfuse
