// tree_reduce on CUDA: one thread per column. Consecutive threads own consecutive columns, so each
// client's row of x is read once and coalesced. Clients are visited cluster by cluster (grouped once
// per layer on the host, as the CPU kernel does), so each cluster's weighted sum builds up in a float64
// register; the C sums of a column wait in shared memory (or a global workspace when C is too large
// for it) until the column total is known. The per-cluster means are the same arithmetic as on CPU
// (tree_reduce_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "nvtx_range.h"
#include "op_checks.h"
#include "tree_reduce_groups.h"
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
  // The clients grouped by cluster on the host, as on CPU (tree_reduce_groups.h: deterministic, and
  // it refuses bad labels and weights with the CPU's messages): one device-to-host copy of labels and
  // weights and one stream sync, then one upload of the groups. No ATen sort/scatter kernels, no
  // atomics, no further syncs.
  const auto pinned = at::TensorOptions().device(at::kCPU).pinned_memory(true);
  at::Tensor lab_host = at::empty(labels.sizes(), pinned.dtype(at::kLong));
  at::Tensor w_host = at::empty(weights.sizes(), pinned.dtype(at::kDouble));
  lab_host.copy_(labels, /*non_blocking=*/true);
  w_host.copy_(weights, /*non_blocking=*/true);
  at::cuda::getCurrentCUDAStream().synchronize();
  const LayerClusters lc = group_clients(lab_host.data_ptr<int64_t>(), w_host.data_ptr<double>(), n_layers, n, n_clusters);
  // int64 block: members [L, N], start [L, C + 1], offsets [L + 1]; double block: member weights
  // [L, N], cluster weights [L, C], total weights [L].
  const int64_t n_ints = n_layers * n + n_layers * (n_clusters + 1) + n_layers + 1;
  const int64_t n_doubles = n_layers * n + n_layers * n_clusters + n_layers;
  at::Tensor ints = at::empty({n_ints}, pinned.dtype(at::kLong));
  at::Tensor doubles = at::empty({n_doubles}, pinned.dtype(at::kDouble));
  int64_t* ip = ints.data_ptr<int64_t>();
  double* dp = doubles.data_ptr<double>();
  const double* wh = w_host.data_ptr<double>();
  for (int64_t t = 0; t < n_layers * n; ++t) {
    ip[t] = lc.members[t];
    dp[t] = wh[lc.members[t]];
  }
  std::copy(lc.start.begin(), lc.start.end(), ip + n_layers * n);
  std::copy(o, o + n_layers + 1, ip + n_layers * n + n_layers * (n_clusters + 1));
  std::copy(lc.weight.begin(), lc.weight.end(), dp + n_layers * n);
  std::copy(lc.total.begin(), lc.total.end(), dp + n_layers * n + n_layers * n_clusters);
  const at::Tensor ints_dev = ints.to(x.device(), /*non_blocking=*/true);  // pinned: the caching host
  const at::Tensor doubles_dev = doubles.to(x.device(), /*non_blocking=*/true);  // allocator keeps them alive
  const int64_t* members = ints_dev.data_ptr<int64_t>();
  const int64_t* start = members + n_layers * n;
  const int64_t* off_dev = start + n_layers * (n_clusters + 1);
  const double* member_weight = doubles_dev.data_ptr<double>();
  const double* cluster_weight = member_weight + n_layers * n;
  const double* total_weight = cluster_weight + n_layers * n_clusters;

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
        xs.data_ptr<scalar_t>(), xs.stride(0), n, p, off_dev, n_layers, members, member_weight, start, cluster_weight,
        total_weight, n_clusters, shared ? nullptr : workspace.data_ptr<double>(),
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
