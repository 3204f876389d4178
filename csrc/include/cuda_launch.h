// Launch helpers shared by the CUDA kernels (included by csrc/cuda/*.cu only): how much dynamic
// shared memory a block may use on the current device, and the opt-in above the default 48 KiB.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace fedtreelora {

// The device's opt-in limit of dynamic shared memory per block (sm_80: 163 KiB, sm_90: 227 KiB).
// FEDTREELORA_CUDA_SHARED_BYTES lowers it: the tests use it to reach the global-workspace paths
// with small inputs.
inline int64_t shared_memory_budget() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  int64_t budget = static_cast<int64_t>(std::max(prop->sharedMemPerBlockOptin, prop->sharedMemPerBlock));
  if (const char* cap = std::getenv("FEDTREELORA_CUDA_SHARED_BYTES")) {
    const long long v = std::strtoll(cap, nullptr, 10);
    if (v > 0) budget = std::min<int64_t>(budget, v);
  }
  return budget;
}

// Above the default limit (48 KiB), a kernel must opt in to its dynamic shared memory before launch.
template <typename Kernel>
void allow_dynamic_shared_memory(Kernel* kernel, int64_t bytes) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (bytes > static_cast<int64_t>(prop->sharedMemPerBlock))
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace fedtreelora
