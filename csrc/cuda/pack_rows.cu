// pack_rows on CUDA: the CPU kernel's checks (op_checks.h), then one torch.cat per client into its
// row of out (a contiguous [W] view, since out's columns are unit-stride), which ATen batches into a
// few device-to-device copy kernels per row. No kernel of our own: the copies are bandwidth-bound and
// ATen's cat already moves them in wide vectors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "nvtx_range.h"
#include "op_checks.h"

namespace fedtreelora {
namespace {

// parts as a c10::List (the CPU kernel too: one C++ signature per op): unboxing an ArrayRef<Tensor> argument
// inlines torch code that trips GCC's -Wnull-dereference (an error under scripts/cuda_check.sh).
void pack_rows_cuda(const c10::List<at::Tensor>& parts_list, const at::Tensor& out) {
  NvtxRange range("fedtreelora::pack_rows");
  const std::vector<at::Tensor> parts = parts_list.vec();
  const size_t n_keys = check_pack_rows_args(parts, out, at::kCUDA).size() - 1;
  mark_written(out);
  if (out.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  std::vector<at::Tensor> row_parts(n_keys);
  for (int64_t i = 0; i < out.size(0); ++i) {
    for (size_t j = 0; j < n_keys; ++j) row_parts[j] = parts[static_cast<int64_t>(j) * out.size(0) + i].view({-1});
    at::Tensor row = out.select(0, i);
    at::cat_out(row, row_parts, 0);
  }
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) { m.impl("pack_rows", &fedtreelora::pack_rows_cuda); }
