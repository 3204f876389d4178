// CPU kernel of fedtreelora::pack_rows: many tensors copied into the columns of one row-major buffer
// in one parallel pass. torch.stack/cat into a row-strided destination pay a few microseconds of
// dispatch and TensorIterator set-up per piece, which is most of the time for the 16 KB pieces of a
// LoRA factor; here a piece is one memcpy. Work items are the pieces in row-major order (client i's
// keys side by side), so each thread writes a contiguous stretch of out's rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "nvtx_range.h"
#include "op_checks.h"

namespace fedtreelora {
namespace {

// Pieces per task: at least this many bytes each, so that small pieces do not pay a task each.
constexpr int64_t kGrainBytes = 256 * 1024;

// parts as a c10::List, like the CUDA kernel: an operator's kernels must share one C++ signature, and
// the CUDA file cannot take an at::TensorList (see csrc/cuda/pack_rows.cu).
void pack_rows_cpu(const c10::List<at::Tensor>& parts_list, const at::Tensor& out) {
  NvtxRange range("fedtreelora::pack_rows");
  const std::vector<at::Tensor> parts = parts_list.vec();
  const std::vector<int64_t> cols = check_pack_rows_args(parts, out, at::kCPU);
  mark_written(out);
  if (cols.back() == 0) return;  // no columns (or no keys): nothing to copy
  const int64_t n = out.size(0), n_keys = static_cast<int64_t>(cols.size()) - 1;
  const int64_t item = out.element_size();
  const int64_t row_bytes = out.stride(0) * item;
  char* base = static_cast<char*>(out.mutable_data_ptr());
  // The parts' addresses in one flat array: the copy loop then touches no TensorImpl (96,000 of them,
  // scattered in memory, for 1,000 clients of a 24-layer model). const_data_ptr: a lazily cloned
  // (copy-on-write) part is read without being materialised.
  std::vector<const char*> src(parts.size());
  for (size_t q = 0; q < parts.size(); ++q) src[q] = static_cast<const char*>(parts[q].const_data_ptr());
  const int64_t pieces = n * n_keys;
  const int64_t piece_bytes = std::max<int64_t>(1, cols[n_keys] * item / n_keys);  // on average
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / piece_bytes);
  at::parallel_for(0, pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / n_keys, j = t % n_keys;
      const int64_t bytes = (cols[j + 1] - cols[j]) * item;
      if (bytes > 0) std::memcpy(base + i * row_bytes + cols[j] * item, src[j * n + i], bytes);  // empty: maybe no pointer
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) { m.impl("pack_rows", &pack_rows_cpu); }

}  // namespace fedtreelora
