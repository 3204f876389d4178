// tree_reduce on CUDA: one thread per column. Consecutive threads own consecutive columns, so each
// client's row of x is read once and coalesced. Clients are visited cluster by cluster (grouped once
// per layer by a stable sort of the labels), so each cluster's weighted sum builds up in a float64
// register; the C sums of a column wait in shared memory (or a global workspace when C is too large
// for it) until the column total is known. The per-cluster means are the same arithmetic as on CPU
// (tree_reduce_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "nvtx_range.h"
#include "op_checks.h"
#include "tree_reduce_math.h"

namespace fedtreelora {
namespace {

constexpr int64_t kSharedBytes = 48 * 1024;  // the default limit of dynamic shared memory per block
constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 32;

// The layer owning column col: the last l with offsets[l] <= col.
__device__ inline int64_t layer_of(const int64_t* offsets, int64_t n_layers, int64_t col) {
  int64_t lo = 0, hi = n_layers - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= col) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) tree_reduce_kernel(const scalar_t* __restrict__ x, int64_t row_stride, int64_t n, int64_t p,
                                   const int64_t* __restrict__ offsets, int64_t n_layers,
                                   const int64_t* __restrict__ members, const double* __restrict__ member_weight,
                                   const int64_t* __restrict__ start, const double* __restrict__ cluster_weight,
                                   const double* __restrict__ total_weight, int64_t n_clusters,
                                   double* __restrict__ global_acc, scalar_t* __restrict__ cluster_out,
                                   scalar_t* __restrict__ external_out) {
  extern __shared__ double shared_acc[];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p) return;  // no block-wide synchronisation below, so leaving early is safe
  // Cluster c's sum for this column is kept in acc[c * stride] until the total is known.
  double* acc = global_acc != nullptr ? global_acc + col : shared_acc + threadIdx.x;
  const int64_t stride = global_acc != nullptr ? p : static_cast<int64_t>(blockDim.x);

  const int64_t layer = layer_of(offsets, n_layers, col);
  // The same for every thread of the layer: broadcast reads.
  const int64_t* mem = members + layer * n;
  const double* mw = member_weight + layer * n;
  const int64_t* st = start + layer * (n_clusters + 1);
  double total = 0.0;
  for (int64_t c = 0; c < n_clusters; ++c) {
    double sum = 0.0;  // in a register: the client loop is one coalesced load and one FMA per client
#pragma unroll 4
    for (int64_t t = st[c]; t < st[c + 1]; ++t) sum += mw[t] * static_cast<double>(x[mem[t] * row_stride + col]);
    acc[c * stride] = sum;
    total += sum;
  }
  const double* cw = cluster_weight + layer * n_clusters;
  for (int64_t c = 0; c < n_clusters; ++c) {
    const double sum = acc[c * stride];
    const int64_t count = st[c + 1] - st[c];
    cluster_out[c * p + col] = static_cast<scalar_t>(cluster_mean(sum, cw[c], count));
    external_out[c * p + col] = static_cast<scalar_t>(external_mean(total, sum, total_weight[layer], cw[c], count, n));
  }
}

std::tuple<at::Tensor, at::Tensor> tree_reduce_cuda(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                    const at::Tensor& labels, const at::Tensor& weights,
                                                    int64_t n_clusters) {
  NvtxRange range("fedtreelora::tree_reduce");
  for (const at::Tensor* t : {&x, &layer_offsets, &labels, &weights})
    TORCH_CHECK_VALUE(t->is_cuda() && t->device() == x.device(),
                      "tree_reduce (CUDA kernel): x, layer_offsets, labels and weights must be on one CUDA device, got ",
                      x.device(), ", ", layer_offsets.device(), ", ", labels.device(), ", ", weights.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> offsets = check_tree_reduce_args(x, layer_offsets, labels, weights, n_clusters);
  const int64_t n = x.size(0), p = x.size(1), n_layers = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t* o = offsets.data();
  const at::Tensor lab = labels.contiguous();
  if (lab.numel() > 0) {
    const auto [lo, hi] = at::aminmax(lab);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < n_clusters, "tree_reduce: labels must lie in [0, n_clusters=", n_clusters,
                      "), found ", lo_v < 0 ? lo_v : hi_v);
  }
  const at::Tensor w = weights.contiguous();
  const at::Tensor bad_weight = at::logical_not(at::isfinite(w)).logical_or_(w <= 0);
  if (bad_weight.any().item<bool>()) {
    const int64_t k = bad_weight.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "tree_reduce: weights must be finite and > 0, client ", k, " has weight ", w[k].item<double>());
  }

  // Per layer: the clients grouped by cluster (a stable sort of the labels), cluster c's members being
  // members[start[c] : start[c + 1]], their weights in that order, and each cluster's summed weight.
  const at::Tensor members = std::get<1>(at::sort(lab, /*stable=*/true, /*dim=*/1, /*descending=*/false)).contiguous();
  const at::Tensor member_weight = w.take(members);
  const at::Tensor cluster_count = at::zeros({n_layers, n_clusters}, lab.options()).scatter_add_(1, lab, at::ones_like(lab));
  const at::Tensor start = at::cat({at::zeros({n_layers, 1}, lab.options()), cluster_count.cumsum(1)}, 1).contiguous();
  const at::Tensor cluster_weight =
      at::zeros({n_layers, n_clusters}, w.options()).scatter_add_(1, lab, w.unsqueeze(0).expand({n_layers, n}));
  const at::Tensor total_weight = cluster_weight.sum(1);
  const at::Tensor off_dev = layer_offsets.contiguous();

  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();  // rows may be strided, columns not
  at::Tensor cluster = at::empty({n_clusters, p}, x.options());
  at::Tensor external = at::empty({n_clusters, p}, x.options());
  if (p == 0) return {cluster, external};

  // The widest block (a power of two) whose [C, threads] float64 accumulators fit in shared memory.
  int threads = kMaxThreads;
  while (threads > kMinThreads && n_clusters * threads * static_cast<int64_t>(sizeof(double)) > kSharedBytes) threads /= 2;
  const bool shared = n_clusters * threads * static_cast<int64_t>(sizeof(double)) <= kSharedBytes;
  at::Tensor workspace;
  if (!shared) workspace = at::empty({n_clusters, p}, x.options().dtype(at::kDouble));
  const size_t shared_bytes = shared ? static_cast<size_t>(n_clusters * threads) * sizeof(double) : 0;
  const int64_t blocks = (p + threads - 1) / threads;
  TORCH_CHECK_VALUE(blocks <= 0x7fffffff, "tree_reduce: too many columns for one CUDA grid (", p, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_reduce_cuda", [&] {
    tree_reduce_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, shared_bytes,
                                   at::cuda::getCurrentCUDAStream()>>>(
        xs.data_ptr<scalar_t>(), xs.stride(0), n, p, off_dev.data_ptr<int64_t>(), n_layers, members.data_ptr<int64_t>(),
        member_weight.data_ptr<double>(), start.data_ptr<int64_t>(), cluster_weight.data_ptr<double>(),
        total_weight.data_ptr<double>(), n_clusters, shared ? nullptr : workspace.data_ptr<double>(),
        cluster.data_ptr<scalar_t>(), external.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cluster, external};
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("tree_reduce", &fedtreelora::tree_reduce_cuda);
}
