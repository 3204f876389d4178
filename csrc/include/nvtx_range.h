// An NVTX range around each op so that `nsys profile` shows it. Header-only NVTX 3 from the
// CUDA toolkit; compiled out when the build found no nvtx3 headers (FEDTREELORA_NVTX undefined).
#pragma once

#if defined(FEDTREELORA_NVTX)
#include <nvtx3/nvToolsExt.h>
namespace fedtreelora {
struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};
}  // namespace fedtreelora
#else
namespace fedtreelora {
struct NvtxRange {
  explicit NvtxRange(const char*) {}
};
}  // namespace fedtreelora
#endif
