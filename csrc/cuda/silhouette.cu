// silhouette on CUDA: one block per (layer, partition, client i). The block sums the row d[l, i, :]
// per cluster into float64 shared memory (atomic adds; labels index the slots directly, in tiles of
// kSlots labels when N is larger), then takes a = own cluster's mean and b = the nearest other
// cluster's mean, and writes s_i; the mean over clients and the NaN of undefined partitions are
// ATen reductions. The per-client formula is shared with the CPU kernel (silhouette_math.h). A NaN in
// d propagates into the score (the Python wrapper refuses d outside its contract before the launch,
// with the same checks and messages as the CPU kernel's pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>

#include <cmath>
#include <limits>

#include "nvtx_range.h"
#include "op_checks.h"
#include "silhouette_math.h"

namespace fedtreelora {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSlots = 4096;  // float64 cluster sums per tile: 32 KiB of shared memory

// min that propagates NaN (fmin drops it): a NaN in d must reach the score, never be skipped.
__device__ inline double nan_min(double a, double b) { return (a != a || b != b) ? CUDART_NAN : (a < b ? a : b); }

// Minimum over the block; every thread gets the result. `scratch` holds one value per warp.
__device__ inline double block_min(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v = nan_min(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x) / 32 ? scratch[lane] : INFINITY;
    for (int offset = 16; offset > 0; offset /= 2) v = nan_min(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const double result = scratch[0];
  __syncthreads();  // scratch is reused by the caller
  return result;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) silhouette_kernel(const scalar_t* __restrict__ d,
                                                             const int64_t* __restrict__ labels,
                                                             const int64_t* __restrict__ sizes,
                                                             const int64_t* __restrict__ n_labels, int64_t n_parts,
                                                             int64_t n, double* __restrict__ scores) {
  __shared__ double sums[kSlots];
  __shared__ double scratch[kThreads / 32];
  __shared__ double own_sum;
  const int64_t i = blockIdx.x, m = blockIdx.y, l = blockIdx.z;
  const int64_t q = l * n_parts + m;  // the partition
  if (!silhouette_defined(n_labels[q], n)) {
    if (threadIdx.x == 0) scores[q * n + i] = 0.0;
    return;  // the whole block leaves: no barrier is skipped by some threads only
  }
  const scalar_t* row = d + (l * n + i) * n;
  const int64_t* lab = labels + q * n;
  const int64_t* size = sizes + q * n;  // size[c]: clients with raw label c
  const int64_t own = lab[i];
  double b = INFINITY;
  for (int64_t t0 = 0; t0 < n; t0 += kSlots) {
    const int64_t t1 = t0 + kSlots < n ? t0 + kSlots : n;
    for (int64_t c = threadIdx.x; c < t1 - t0; c += blockDim.x) sums[c] = 0.0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const int64_t c = lab[j];
      if (c >= t0 && c < t1) atomicAdd(&sums[c - t0], static_cast<double>(row[j]));
    }
    __syncthreads();
    for (int64_t c = t0 + threadIdx.x; c < t1; c += blockDim.x) {
      if (c == own) own_sum = sums[c - t0];
      else if (size[c] > 0) b = nan_min(b, sums[c - t0] / static_cast<double>(size[c]));
    }
    __syncthreads();
  }
  b = block_min(b, scratch);
  if (threadIdx.x == 0) {
    const double a = own_sum / static_cast<double>(size[own] > 1 ? size[own] - 1 : 1);
    scores[q * n + i] = silhouette_from_means(a, b, size[own]);
  }
}

at::Tensor silhouette_cuda(const at::Tensor& d, const at::Tensor& labels) {
  NvtxRange range("fedtreelora::silhouette");
  TORCH_CHECK_VALUE(d.is_cuda() && labels.device() == d.device(),
                    "silhouette (CUDA kernel): d and labels must be on one CUDA device, got ", d.device(), " and ",
                    labels.device());
  const c10::cuda::CUDAGuard guard(d.device());
  check_silhouette_args(d, labels);
  const int64_t n_layers = d.size(0), n_parts = labels.size(1), n = d.size(1);
  at::Tensor out = at::empty({n_layers, n_parts}, d.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const at::Tensor lab = labels.contiguous();
  if (n > 0) {
    const auto [lo, hi] = at::aminmax(lab);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < n, "silhouette: labels must lie in [0, N) with N=", n, ", found ",
                      lo_v < 0 ? lo_v : hi_v);
  }
  TORCH_CHECK_VALUE(n_parts <= 65535 && n_layers <= 65535, "silhouette: at most 65535 layers and partitions on CUDA");
  const at::Tensor sizes = at::zeros_like(lab).scatter_add_(2, lab, at::ones_like(lab));  // clients per raw label
  const at::Tensor n_labels = sizes.gt(0).sum(2);                                          // [L, M]
  at::Tensor scores = at::empty({n_layers, n_parts, n}, d.options().dtype(at::kDouble));
  if (n > 0) {
    const at::Tensor dc = d.contiguous();
    const dim3 grid(static_cast<unsigned int>(n), static_cast<unsigned int>(n_parts), static_cast<unsigned int>(n_layers));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dc.scalar_type(), "silhouette_cuda", [&] {
      silhouette_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          dc.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(), n_labels.data_ptr<int64_t>(),
          n_parts, n, scores.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor defined = n_labels.ge(2).logical_and_(n_labels.le(n - 1));
  out.copy_(at::where(defined, scores.mean(2), std::numeric_limits<double>::quiet_NaN()));
  return out;
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("silhouette", &fedtreelora::silhouette_cuda);
}
