// layer_distances on CPU: per layer, one library GEMM (at::mm) for the Gram matrix of the prepared
// slice, then a fused, row-parallel epilogue that writes the layer's distances and adds them into
// the float64 sum over layers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "distance_epilogue.h"
#include "nvtx_range.h"

namespace fedtreelora {

std::vector<int64_t> check_layer_distances_args(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                c10::string_view metric, bool* cosine) {
  TORCH_CHECK_VALUE(metric == "frobenius" || metric == "cosine",
                    "layer_distances: metric must be 'frobenius' or 'cosine', got '", metric, "'");
  *cosine = metric == "cosine";
  TORCH_CHECK_VALUE(x.dim() == 2, "layer_distances: x must be 2-D [clients, parameters], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(x.size(0) >= 1, "layer_distances: x has no clients");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "layer_distances: x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(layer_offsets.scalar_type() == at::kLong,
                   "layer_distances: layer_offsets must be int64, got ", layer_offsets.scalar_type());
  TORCH_CHECK_VALUE(layer_offsets.dim() == 1 && layer_offsets.numel() >= 2,
                    "layer_distances: layer_offsets must be 1-D with at least 2 entries (L+1), got shape ",
                    layer_offsets.sizes());
  const at::Tensor host = layer_offsets.to(at::kCPU).contiguous();
  std::vector<int64_t> offsets(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  TORCH_CHECK_VALUE(offsets.front() == 0, "layer_distances: layer_offsets must start at 0, got ", offsets.front());
  TORCH_CHECK_VALUE(offsets.back() == x.size(1), "layer_distances: layer_offsets must end at the number of columns P=",
                    x.size(1), ", got ", offsets.back());
  for (size_t l = 0; l + 1 < offsets.size(); ++l) {
    TORCH_CHECK_VALUE(offsets[l] < offsets[l + 1], "layer_distances: layer_offsets must be strictly increasing: layer ",
                      l, " spans [", offsets[l], ", ", offsets[l + 1], ")");
  }
  return offsets;
}

at::Tensor layer_gram(const at::Tensor& slice, bool cosine) {
  const auto compute = slice.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty(slice.sizes(), slice.options().dtype(compute));
  if (cosine) {
    at::Tensor norms = at::linalg_vector_norm(slice, 2, {1}, /*keepdim=*/true, at::kDouble);
    at::div_out(rows, slice, norms.masked_fill(norms == 0, 1));  // zero rows stay zero
  } else {
    at::Tensor column_mean = at::sum(slice, {0}, /*keepdim=*/true, at::kDouble).div_(slice.size(0));
    at::sub_out(rows, slice, column_mean);
  }
  // Only the upper triangle is read, so compute a staircase of row blocks against the columns from
  // the block's first row on: (k + 1) / 2k of the full GEMM for k blocks. The rest stays unwritten.
  constexpr int64_t kBlockRows = 256;
  const int64_t n = rows.size(0);
  at::Tensor gram = at::empty({n, n}, rows.options());
  for (int64_t start = 0; start < n; start += kBlockRows) {
    const int64_t count = std::min(kBlockRows, n - start);
    at::Tensor block = gram.narrow(0, start, count).narrow(1, start, n - start);
    at::mm_out(block, rows.narrow(0, start, count), rows.narrow(0, start, n - start).t());
  }
  return gram;
}

namespace {

template <typename T>
void distance_epilogue(const T* gram, float* out, double* total, int64_t n, bool cosine) {
  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // rows per task: enough work to pay for a thread
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const T d = pair_distance(gram, n, i, j, cosine);
        out[i * n + j] = static_cast<float>(d);
        total[i * n + j] += static_cast<double>(d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> layer_distances_cpu(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                       c10::string_view metric) {
  NvtxRange range("fedtreelora::layer_distances");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "layer_distances (CPU kernel): x must be a CPU tensor, got ", x.device());
  bool cosine = false;
  const std::vector<int64_t> offsets = check_layer_distances_args(x, layer_offsets, metric, &cosine);
  const int64_t n = x.size(0);
  const int64_t layers = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor per_layer = at::empty({layers, n, n}, x.options().dtype(at::kFloat));
  at::Tensor total = at::zeros({n, n}, x.options().dtype(at::kDouble));
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor gram = layer_gram(x.narrow(1, offsets[l], offsets[l + 1] - offsets[l]), cosine).contiguous();
    float* out = per_layer.data_ptr<float>() + l * n * n;
    if (gram.scalar_type() == at::kDouble) {
      distance_epilogue(gram.data_ptr<double>(), out, total.data_ptr<double>(), n, cosine);
    } else {
      distance_epilogue(gram.data_ptr<float>(), out, total.data_ptr<double>(), n, cosine);
    }
  }
  return {per_layer, total.div_(layers).to(at::kFloat)};
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) {
  m.impl("layer_distances", &fedtreelora::layer_distances_cpu);
}
