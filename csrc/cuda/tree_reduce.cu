// tree_reduce on CUDA: blocks of 256 threads over column tiles that never cross a layer (as the CPU
// kernel's chunks). Each thread owns V consecutive columns (V * sizeof(x) = 16 bytes, one vector load
// per client row, where x's pointer and row stride allow; else V = 1) and walks the clients cluster
// by cluster (grouped once per call on the host, as on CPU), eight rows' loads in flight at a time,
// each cluster's weighted sums building up in float64 registers. The C sums of a column wait in
// shared memory (opted in above 48 KiB) or, when C is too large for it, in a global workspace, until
// the column total is known. The per-cluster means are the CPU's arithmetic (tree_reduce_math.h).
// Deterministic: every sum runs in client order within a cluster, with no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_launch.h"
#include "nvtx_range.h"
#include "op_checks.h"
#include "tree_reduce_groups.h"
#include "tree_reduce_math.h"

namespace fedtreelora {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 8;  // client rows loaded before their sums are taken: 8 x 16 bytes in flight per thread

// V elements moved as one 16-byte (or 8-, 4-byte) access; alignment is the host's to guarantee.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ inline Pack<scalar_t, V> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(p);
}

// Block b covers columns tile_begin[b] + [0, kThreads * V) of layer tile_layer[b]; tile_begin is
// rounded down to a multiple of V (so that vector loads are aligned) and thread lanes outside the
// layer's columns compute but write nothing. acc: [C][V][kThreads] doubles, shared or, with a
// workspace, the block's own slice of it (conflict-free and coalesced either way).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    tree_reduce_kernel(const scalar_t* __restrict__ x, int64_t row_stride, int64_t n, int64_t p,
                       const int64_t* __restrict__ offsets, const int64_t* __restrict__ tile_layer,
                       const int64_t* __restrict__ tile_begin, const int64_t* __restrict__ members,
                       const double* __restrict__ member_weight, const int64_t* __restrict__ start,
                       const double* __restrict__ cluster_weight, const double* __restrict__ total_weight,
                       int64_t n_clusters, double* __restrict__ workspace, scalar_t* __restrict__ cluster_out,
                       scalar_t* __restrict__ external_out) {
  extern __shared__ double shared_acc[];
  const int64_t tile = blockIdx.x;
  const int64_t layer = tile_layer[tile];
  const int64_t lo = offsets[layer], hi = offsets[layer + 1];
  const int64_t col0 = tile_begin[tile] + static_cast<int64_t>(threadIdx.x) * V;
  if (col0 + V <= lo || col0 >= hi) return;  // none of this thread's columns is the layer's; no barriers below
  double* acc = (workspace != nullptr ? workspace + tile * n_clusters * V * kThreads : shared_acc) + threadIdx.x;
  const bool whole = col0 + V <= p;  // all V columns inside the row: one vector load per client

  // The same for every thread of the layer: broadcast reads.
  const int64_t* mem = members + layer * n;
  const double* mw = member_weight + layer * n;
  const int64_t* st = start + layer * (n_clusters + 1);
  double total[V];
#pragma unroll
  for (int e = 0; e < V; ++e) total[e] = 0.0;
  for (int64_t c = 0; c < n_clusters; ++c) {
    double sum[V];
#pragma unroll
    for (int e = 0; e < V; ++e) sum[e] = 0.0;
    int64_t t = st[c];
    const int64_t end = st[c + 1];
    if (whole) {
      for (; t + kUnroll <= end; t += kUnroll) {
        Pack<scalar_t, V> v[kUnroll];
        double w[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          w[u] = mw[t + u];
          v[u] = load_pack<scalar_t, V>(x + mem[t + u] * row_stride + col0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int e = 0; e < V; ++e) sum[e] += w[u] * static_cast<double>(v[u].v[e]);
      }
      for (; t < end; ++t) {
        const Pack<scalar_t, V> v = load_pack<scalar_t, V>(x + mem[t] * row_stride + col0);
#pragma unroll
        for (int e = 0; e < V; ++e) sum[e] += mw[t] * static_cast<double>(v.v[e]);
      }
    } else {  // the row's last, partial vector: scalar loads of the columns that exist
      for (; t < end; ++t) {
        const scalar_t* row = x + mem[t] * row_stride;
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (col0 + e < p) sum[e] += mw[t] * static_cast<double>(row[col0 + e]);
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      acc[(c * V + e) * kThreads] = sum[e];
      total[e] += sum[e];
    }
  }

  // Epilogue: the means, written as one vector per thread where all V columns are the layer's and
  // the outputs' rows keep the alignment (p a multiple of V), else column by column.
  const double* cw = cluster_weight + layer * n_clusters;
  const double tw = total_weight[layer];
  const bool vector_store = V > 1 && col0 >= lo && col0 + V <= hi && p % V == 0;
  for (int64_t c = 0; c < n_clusters; ++c) {
    const int64_t count = st[c + 1] - st[c];
    Pack<scalar_t, V> cl, ex;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const double sum = acc[(c * V + e) * kThreads];
      cl.v[e] = static_cast<scalar_t>(cluster_mean(sum, cw[c], count));
      ex.v[e] = static_cast<scalar_t>(external_mean(total[e], sum, tw, cw[c], count, n));
    }
    if (vector_store) {
      *reinterpret_cast<Pack<scalar_t, V>*>(cluster_out + c * p + col0) = cl;
      *reinterpret_cast<Pack<scalar_t, V>*>(external_out + c * p + col0) = ex;
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (col0 + e < lo || col0 + e >= hi) continue;
        cluster_out[c * p + col0 + e] = cl.v[e];
        external_out[c * p + col0 + e] = ex.v[e];
      }
    }
  }
}

// Where the accumulators live and how wide a thread's columns are, chosen on the host.
struct Plan {
  bool vector;    // V = 16 / sizeof(x) (else 1)
  bool shared;    // accumulators in shared memory (else the global workspace)
  int64_t bytes;  // dynamic shared memory per block
};

// The block never narrows below kThreads. Among the layouts whose accumulators fit in shared memory,
// the one with more bytes of x in flight per SM (resident blocks x threads x kUnroll loads x their
// width): vector loads need V times the shared memory, which can cost more resident blocks than the
// wider loads bring. Past the shared memory, the global workspace.
template <typename ScalarKernel, typename VectorKernel>
Plan plan_for(const at::Tensor& x, int64_t n_clusters, ScalarKernel* scalar_kernel, VectorKernel* vector_kernel) {
  const int64_t elem = x.element_size();
  const int64_t vec = 16 / elem;
  // 16-byte loads need the row starts 16-byte aligned: the data pointer and the row stride.
  const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.stride(0) * elem) % 16 == 0;
  const int64_t budget = shared_memory_budget();
  const int64_t scalar_bytes = n_clusters * kThreads * static_cast<int64_t>(sizeof(double));
  const int64_t vector_bytes = scalar_bytes * vec;
  const bool vector_fits = aligned && vector_bytes <= budget, scalar_fits = scalar_bytes <= budget;
  if (!vector_fits && !scalar_fits) return {aligned, false, 0};
  if (!scalar_fits) return {true, true, vector_bytes};
  if (!vector_fits) return {false, true, scalar_bytes};
  auto in_flight = [&](auto* kernel, int64_t width, int64_t bytes) {
    allow_dynamic_shared_memory(kernel, bytes);
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, static_cast<size_t>(bytes)));
    return static_cast<int64_t>(blocks) * kThreads * kUnroll * width * elem;
  };
  if (in_flight(vector_kernel, vec, vector_bytes) >= in_flight(scalar_kernel, 1, scalar_bytes))
    return {true, true, vector_bytes};
  return {false, true, scalar_bytes};
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
  check_tree_reduce_shapes(x, layer_offsets, labels, weights, n_clusters);
  const int64_t n = x.size(0), p = x.size(1), n_layers = layer_offsets.numel() - 1;
  // Offsets, labels and weights to the host in one go: three copies, the one stream sync. Then the
  // CPU's checks and grouping (tree_reduce_groups.h: deterministic, the CPU's messages), and one
  // upload of the groups and the column tiles. No ATen sort/scatter kernels, no further syncs.
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto pinned = at::TensorOptions().device(at::kCPU).pinned_memory(true);
  at::Tensor off_host = at::empty({n_layers + 1}, pinned.dtype(at::kLong));
  at::Tensor lab_host = at::empty(labels.sizes(), pinned.dtype(at::kLong));
  at::Tensor w_host = at::empty(weights.sizes(), pinned.dtype(at::kDouble));
  off_host.copy_(layer_offsets, /*non_blocking=*/true);
  lab_host.copy_(labels, /*non_blocking=*/true);
  w_host.copy_(weights, /*non_blocking=*/true);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int64_t* o = off_host.data_ptr<int64_t>();
  check_tree_reduce_offsets(o, n_layers, p);
  const LayerClusters lc = group_clients(lab_host.data_ptr<int64_t>(), w_host.data_ptr<double>(), n_layers, n, n_clusters);

  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();  // rows may be strided, columns not
  at::Tensor cluster = at::empty({n_clusters, p}, x.options());
  at::Tensor external = at::empty({n_clusters, p}, x.options());
  if (p == 0) return {cluster, external};
  Plan plan{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "tree_reduce_cuda_plan", [&] {
    constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
    plan = plan_for(xs, n_clusters, tree_reduce_kernel<scalar_t, 1>, tree_reduce_kernel<scalar_t, kVec>);
  });
  const int64_t v = plan.vector ? 16 / static_cast<int64_t>(xs.element_size()) : 1;

  // Column tiles per layer, from the layer's first column rounded down to a multiple of V.
  std::vector<int64_t> tile_layer, tile_begin;
  const int64_t width = kThreads * v;
  for (int64_t l = 0; l < n_layers; ++l)
    for (int64_t c0 = o[l] / v * v; c0 < o[l + 1]; c0 += width) {
      tile_layer.push_back(l);
      tile_begin.push_back(c0);
    }
  const int64_t n_tiles = static_cast<int64_t>(tile_layer.size());
  TORCH_CHECK_VALUE(n_tiles <= std::numeric_limits<int32_t>::max(), "tree_reduce: too many columns for one CUDA grid (", p,
                    ")");

  // int64 block: members [L, N], start [L, C + 1], offsets [L + 1], tile layers and begins [tiles];
  // double block: member weights [L, N], cluster weights [L, C], total weights [L].
  const int64_t n_ints = n_layers * n + n_layers * (n_clusters + 1) + n_layers + 1 + 2 * n_tiles;
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
  int64_t* ip_start = ip + n_layers * n;
  int64_t* ip_offsets = ip_start + n_layers * (n_clusters + 1);
  int64_t* ip_tile_layer = ip_offsets + n_layers + 1;
  int64_t* ip_tile_begin = ip_tile_layer + n_tiles;
  std::copy(lc.start.begin(), lc.start.end(), ip_start);
  std::copy(o, o + n_layers + 1, ip_offsets);
  std::copy(tile_layer.begin(), tile_layer.end(), ip_tile_layer);
  std::copy(tile_begin.begin(), tile_begin.end(), ip_tile_begin);
  std::copy(lc.weight.begin(), lc.weight.end(), dp + n_layers * n);
  std::copy(lc.total.begin(), lc.total.end(), dp + n_layers * n + n_layers * n_clusters);
  const at::Tensor ints_dev = ints.to(x.device(), /*non_blocking=*/true);        // pinned: the caching host
  const at::Tensor doubles_dev = doubles.to(x.device(), /*non_blocking=*/true);  // allocator keeps them alive
  const int64_t* members = ints_dev.data_ptr<int64_t>();
  const int64_t* start = members + n_layers * n;
  const int64_t* off_dev = start + n_layers * (n_clusters + 1);
  const int64_t* tl_dev = off_dev + n_layers + 1;
  const int64_t* tb_dev = tl_dev + n_tiles;
  const double* member_weight = doubles_dev.data_ptr<double>();
  const double* cluster_weight = member_weight + n_layers * n;
  const double* total_weight = cluster_weight + n_layers * n_clusters;

  at::Tensor workspace;
  if (!plan.shared) workspace = at::empty({n_tiles * n_clusters * v * kThreads}, x.options().dtype(at::kDouble));
  double* ws = plan.shared ? nullptr : workspace.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "tree_reduce_cuda", [&] {
    constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
    auto launch = [&](auto kernel) {
      allow_dynamic_shared_memory(kernel, plan.bytes);
      kernel<<<static_cast<unsigned int>(n_tiles), kThreads, static_cast<size_t>(plan.bytes), stream>>>(
          xs.data_ptr<scalar_t>(), xs.stride(0), n, p, off_dev, tl_dev, tb_dev, members, member_weight, start,
          cluster_weight, total_weight, n_clusters, ws, cluster.data_ptr<scalar_t>(), external.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (plan.vector) {
      launch(tree_reduce_kernel<scalar_t, kVec>);
    } else {
      launch(tree_reduce_kernel<scalar_t, 1>);
    }
  });
  return {cluster, external};
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("tree_reduce", &fedtreelora::tree_reduce_cuda);
}
