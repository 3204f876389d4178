// layer_distances on CUDA: per layer, the rows prepared through ATen and the same staircase Gram as
// on CPU (cuBLAS through at::mm), then an epilogue kernel with one thread per (i, j) that writes the layer's
// distances and adds them into the float64 sum over layers. The per-element math is shared with the
// CPU kernel through distance_epilogue.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distance_epilogue.h"
#include "nvtx_range.h"

namespace fedtreelora {
namespace {

constexpr int kThreads = 256;

// One layer's slice [n, w] made ready for the Gram trick (see upper_gram in distance_epilogue.h),
// in float32 (float64 for float64 input); ATen's CUDA kernels compute the mixed-dtype steps in
// float64 on the fly.
at::Tensor prepared_rows(const at::Tensor& slice, bool cosine) {
  const auto compute = slice.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty(slice.sizes(), slice.options().dtype(compute));
  if (cosine) {
    // Divided by the row's largest magnitude first: no overflow or underflow in the squares.
    const at::Tensor peak = at::amax(at::abs(slice), {1}, /*keepdim=*/true).to(at::kDouble);
    at::div_out(rows, slice, peak.masked_fill(peak == 0, 1));  // zero rows stay zero
    const at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true, at::kDouble);
    rows.div_(norms.masked_fill(norms == 0, 1));
  } else {
    const at::Tensor column_mean = at::sum(slice, {0}, /*keepdim=*/true, at::kDouble).div_(slice.size(0));
    at::sub_out(rows, slice, column_mean);
  }
  return rows;
}

template <typename T>
__global__ void distance_epilogue_kernel(const T* gram, float* out, double* total, int64_t n, bool cosine,
                                         double scale) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n * n) return;
  const double d = static_cast<double>(pair_distance(gram, n, k / n, k % n, cosine)) * scale;
  out[k] = static_cast<float>(d);
  total[k] += d;
}

template <typename T>
void launch_epilogue(const at::Tensor& gram, float* out, at::Tensor& total, int64_t n, bool cosine, double scale) {
  const int64_t blocks = (n * n + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(blocks <= 0x7fffffff, "layer_distances: too many clients for one CUDA grid (", n, ")");
  distance_epilogue_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      gram.data_ptr<T>(), out, total.data_ptr<double>(), n, cosine, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> layer_distances_cuda(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                        c10::string_view metric) {
  NvtxRange range("fedtreelora::layer_distances");
  TORCH_CHECK_VALUE(x.is_cuda(), "layer_distances (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  bool cosine = false;
  const std::vector<int64_t> offsets = check_layer_distances_args(x, layer_offsets, metric, &cosine);
  const int64_t n = x.size(0);
  const int64_t layers = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor per_layer = at::empty({layers, n, n}, x.options().dtype(at::kFloat));
  at::Tensor total = at::zeros({n, n}, x.options().dtype(at::kDouble));
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor rows = prepared_rows(x.narrow(1, offsets[l], offsets[l + 1] - offsets[l]), cosine);
    const double scale = cosine ? 1.0 : rescale_rows(rows);  // one host sync per layer
    const at::Tensor gram = upper_gram(rows);
    float* out = per_layer.data_ptr<float>() + l * n * n;
    if (gram.scalar_type() == at::kDouble) {
      launch_epilogue<double>(gram, out, total, n, cosine, scale);
    } else {
      launch_epilogue<float>(gram, out, total, n, cosine, scale);
    }
  }
  return {per_layer, total.div_(layers).to(at::kFloat)};
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("layer_distances", &fedtreelora::layer_distances_cuda);
}
