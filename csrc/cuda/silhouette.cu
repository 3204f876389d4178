// silhouette on CUDA, the CPU kernel's algorithm (cpu/silhouette.cpp): the partitions are renumbered
// and refined on the host (silhouette_partitions.h, the CPU's code and messages: one copy of the labels,
// one stream sync), then one block per (layer, client row i) reads the row d[l, i, :] once and sums it
// per class of the layer's common refinement; every partition's cluster sums are sums of class sums,
// and a, b and s follow (silhouette_math.h). A second kernel averages the scores in client order, as on
// CPU. No atomics: every sum has a fixed order, so the result is deterministic.
//
// The class sums: the clients ordered by class (the refinement's members, a class's members in client
// order) are split into blockDim.x contiguous slices, one per thread. A class that lies inside a slice
// is summed and stored by that thread; a class that crosses slices is finished by the thread whose slice
// holds its first member, adding the partial sums of the following slices in slice order.
//
// The wrapper (fedtreelora.ops.silhouette) checks d's contract before the launch (finite, >= 0, zero
// diagonal: the CPU kernel's messages). The kernel itself never drops a NaN: a row whose sums are not
// finite scores NaN under every partition (reached only when the wrapper's checks are skipped, as
// under torch.compile), so the mean is NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda_launch.h"
#include "nvtx_range.h"
#include "op_checks.h"
#include "silhouette_math.h"
#include "silhouette_partitions.h"

namespace fedtreelora {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 32;
constexpr int kScratch = kMaxThreads / 32;  // one slot per warp for block_min
// Dynamic shared memory, in doubles: head[T], tail[T], scratch, own cluster's sum, then (unless the
// class sums live in the global workspace) the class sums.
__host__ __device__ constexpr int64_t fixed_doubles(int64_t threads) { return 2 * threads + kScratch + 1; }

// The host-side preparation, uploaded as one int32 block (every value is below N < 2^31).
struct Prepared {
  const int32_t* members;      // [L, N] clients ordered by refinement class
  const int32_t* class_of;     // [L, N] class of the client at each of those positions
  const int32_t* class_start;  // [L, N + 1] class r's positions are class_start[r] .. class_start[r + 1] - 1
  const int32_t* layer_used;   // [L] 1 if some partition of the layer is scored
  const int32_t* label;        // [L, M, N] compact cluster of each client
  const int32_t* size;         // [L, M, N] members of each compact cluster
  const int32_t* order;        // [L, M, N] the layer's classes ordered by cluster of partition m
  const int32_t* order_start;  // [L, M, N + 1] cluster c's classes are order[order_start[c] .. order_start[c + 1] - 1]
  const int32_t* n_labels;     // [L, M] clusters per partition
};

// min that propagates NaN (fmin drops it).
__device__ inline double nan_min(double a, double b) { return (a != a || b != b) ? CUDART_NAN : (a < b ? a : b); }

// Minimum over the block; every thread gets the result. `scratch` holds one value per warp.
__device__ inline double block_min(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v = nan_min(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x) / 32 ? scratch[lane] : CUDART_INF;
    for (int offset = 16; offset > 0; offset /= 2) v = nan_min(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const double result = scratch[0];
  __syncthreads();  // scratch is reused by the caller
  return result;
}

// Sum of row[members[t]] for t in [begin, end), in double: four independent accumulators, so that
// the gathers are in flight together; a fixed order.
template <typename scalar_t>
__device__ inline double run_sum(const scalar_t* __restrict__ row, const int32_t* __restrict__ members, int64_t begin,
                                 int64_t end) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t t = begin;
  for (; t + 4 <= end; t += 4) {
    s0 += static_cast<double>(row[members[t]]);
    s1 += static_cast<double>(row[members[t + 1]]);
    s2 += static_cast<double>(row[members[t + 2]]);
    s3 += static_cast<double>(row[members[t + 3]]);
  }
  for (; t < end; ++t) s0 += static_cast<double>(row[members[t]]);
  return (s0 + s1) + (s2 + s3);
}

// Rows (l, i) = items blockIdx.x, blockIdx.x + gridDim.x, ... (the grid is bounded when the class sums
// use the global workspace, one max_classes slot per block). scores [L, M, N]: entries of undefined
// partitions are left unwritten (the mean kernel never reads them).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) silhouette_rows_kernel(const scalar_t* __restrict__ d, int64_t n_layers,
                                                                     int64_t n_parts, int64_t n, Prepared prep,
                                                                     int64_t max_classes, double* __restrict__ workspace,
                                                                     double* __restrict__ scores) {
  extern __shared__ double smem[];
  const int64_t threads = blockDim.x, tid = threadIdx.x;
  double* head = smem;                // head[k]: slice k's first run, when its class began in an earlier slice
  double* tail = smem + threads;      // tail[k]: slice k's last run, when its class begins in k and goes on
  double* scratch = smem + 2 * threads;
  double* own_sum = scratch + kScratch;
  double* class_sum = workspace != nullptr ? workspace + static_cast<int64_t>(blockIdx.x) * max_classes
                                           : smem + fixed_doubles(threads);
  // This thread's slice of the class-ordered positions (the same for every row of the layer).
  const int64_t t0 = tid * n / threads, t1 = (tid + 1) * n / threads;
  for (int64_t item = blockIdx.x; item < n_layers * n; item += gridDim.x) {
    const int64_t l = item / n, i = item % n;  // once per row, not per element
    if (prep.layer_used[l] == 0) continue;     // the same for the whole block: no barrier is skipped by some only
    const scalar_t* row = d + item * n;        // d[l, i, :]
    const int32_t* members = prep.members + l * n;
    const int32_t* class_of = prep.class_of + l * n;
    const int32_t* class_start = prep.class_start + l * (n + 1);

    // 1. the runs of this slice: inner classes stored, a head or tail kept for the combine.
    head[tid] = 0.0;
    tail[tid] = 0.0;
    bool finite = true;
    for (int64_t t = t0; t < t1;) {
      const int32_t r = class_of[t];
      const int64_t begin = class_start[r], end = class_start[r + 1];
      const int64_t stop = end < t1 ? end : t1;
      const double s = run_sum(row, members, t, stop);
      if (begin < t0) {
        head[tid] = s;  // only the first run can have begun before the slice
      } else if (end > t1) {
        tail[tid] = s;  // only the last run can go on after it
      } else {
        class_sum[r] = s;
        finite = finite && isfinite(s);
      }
      t = stop;
    }
    __syncthreads();
    // 2. a class that crosses slices: its first slice adds the following slices' heads, in slice order.
    if (t0 < t1) {
      const int32_t r = class_of[t1 - 1];
      const int64_t begin = class_start[r], end = class_start[r + 1];
      if (begin >= t0 && end > t1) {
        double s = tail[tid];
        for (int64_t k = tid + 1; k < threads && k * n / threads < end; ++k) s += head[k];
        class_sum[r] = s;
        finite = finite && isfinite(s);
      }
    }
    // The barrier before the class sums are read; a NaN or Inf anywhere in the row reaches some class sum.
    const bool row_finite = __syncthreads_or(finite ? 0 : 1) == 0;

    // 3. every partition: cluster sums from class sums (cluster c summed by thread c mod T, its classes
    // in a fixed order), a = own cluster's mean distance, b = the nearest other cluster's.
    for (int64_t m = 0; m < n_parts; ++m) {
      const int64_t q = l * n_parts + m;
      const int64_t k = prep.n_labels[q];
      if (!silhouette_defined(k, n)) continue;  // the same for the whole block
      const int32_t own = prep.label[q * n + i];
      const int32_t* order = prep.order + q * n;
      const int32_t* order_start = prep.order_start + q * (n + 1);
      const int32_t* size = prep.size + q * n;
      double b = CUDART_INF;
      for (int64_t c = tid; c < k; c += threads) {
        double s = 0.0;
        for (int64_t t = order_start[c]; t < order_start[c + 1]; ++t) s += class_sum[order[t]];
        if (c == own) {
          *own_sum = s;
        } else {
          b = nan_min(b, isfinite(s) ? s / static_cast<double>(size[c]) : CUDART_NAN);
        }
      }
      b = block_min(b, scratch);  // its barriers also publish *own_sum
      if (tid == 0) {
        const double own_total = *own_sum;
        const int64_t own_size = size[own];
        const double a = own_total / static_cast<double>(own_size > 1 ? own_size - 1 : 1);
        // silhouette_from_means would turn b = NaN into 0: an undefined sum must stay NaN.
        scores[q * n + i] =
            row_finite && isfinite(own_total) && isfinite(b) ? silhouette_from_means(a, b, own_size) : CUDART_NAN;
      }
      __syncthreads();  // *own_sum is rewritten by the next partition
    }
    __syncthreads();  // head, tail and the class sums are rewritten by the next row
  }
}

// out[q] = the mean of the N scores of partition q, summed in client order (as on CPU); NaN where the
// partition is undefined. One thread per partition: L * M threads reading L * M * N doubles.
__global__ void silhouette_mean_kernel(const double* __restrict__ scores, const int32_t* __restrict__ n_labels,
                                       int64_t n_partitions, int64_t n, float* __restrict__ out) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= n_partitions) return;
  if (!silhouette_defined(n_labels[q], n)) {
    out[q] = CUDART_NAN_F;
    return;
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += scores[q * n + i];
  out[q] = static_cast<float>(total / static_cast<double>(n));
}

// A power of two in [32, 256], about eight class-ordered positions per thread.
int threads_for(int64_t n) {
  int threads = kMinThreads;
  while (threads < kMaxThreads && threads * 8 < n) threads *= 2;
  return threads;
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
  if (n == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());  // no partition is defined
  TORCH_CHECK_VALUE(n < std::numeric_limits<int32_t>::max(), "silhouette: at most 2^31 - 2 clients on CUDA, got ", n);

  // The labels on the host: one copy, the one stream sync; then the CPU's renumbering and refinement.
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto pinned = at::TensorOptions().device(at::kCPU).dtype(at::kLong).pinned_memory(true);
  at::Tensor lab_host = at::empty(labels.sizes(), pinned);
  lab_host.copy_(labels, /*non_blocking=*/true);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  const Partitions p = compact_partitions(lab_host, n);
  const Refinement f = refine_partitions(p, n_layers, n_parts, n);

  // One int32 block, in the order of Prepared's fields.
  const int64_t lmn = n_layers * n_parts * n;
  const int64_t sizes[] = {n_layers * n, n_layers * n,   n_layers * (n + 1),           n_layers, lmn, lmn, lmn,
                           n_layers * n_parts * (n + 1), n_layers * n_parts};
  int64_t total_ints = 0;
  for (const int64_t s : sizes) total_ints += s;
  at::Tensor host = at::empty({total_ints}, pinned.dtype(at::kInt));
  int32_t* h = host.data_ptr<int32_t>();
  int32_t* field[9];
  for (int k = 0; k < 9; ++k) {
    field[k] = h;
    h += sizes[k];
  }
  int64_t max_classes = 1;
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t n_classes = f.n_classes[l];
    max_classes = std::max(max_classes, n_classes);
    std::memcpy(field[0] + l * n, f.members.data() + l * n, sizeof(int32_t) * n);
    const int64_t* start = f.start.data() + l * (n + 1);
    for (int64_t r = 0; r <= n_classes; ++r) field[2][l * (n + 1) + r] = static_cast<int32_t>(start[r]);
    for (int64_t r = 0; r < n_classes; ++r)
      for (int64_t t = start[r]; t < start[r + 1]; ++t) field[1][l * n + t] = static_cast<int32_t>(r);
    bool used = false;
    for (int64_t m = 0; m < n_parts; ++m) {
      const int64_t q = l * n_parts + m, k = p.n_labels[q];
      used = used || silhouette_defined(k, n);
      field[8][q] = static_cast<int32_t>(k);
      std::memcpy(field[4] + q * n, p.label.data() + q * n, sizeof(int32_t) * n);
      const int64_t* cstart = p.start.data() + q * (n + 1);
      for (int64_t c = 0; c < k; ++c) field[5][q * n + c] = static_cast<int32_t>(cstart[c + 1] - cstart[c]);
      // The classes ordered by their cluster in partition m (a stable counting sort).
      const int32_t* cluster_of = f.cluster.data() + q * n;
      int32_t* order_start = field[7] + q * (n + 1);
      std::fill(order_start, order_start + k + 1, 0);
      for (int64_t r = 0; r < n_classes; ++r) ++order_start[cluster_of[r] + 1];
      for (int64_t c = 0; c < k; ++c) order_start[c + 1] += order_start[c];
      std::vector<int32_t> next(order_start, order_start + k);
      for (int64_t r = 0; r < n_classes; ++r) field[6][q * n + next[cluster_of[r]]++] = static_cast<int32_t>(r);
    }
    field[3][l] = used ? 1 : 0;
  }
  const at::Tensor dev = host.to(d.device(), /*non_blocking=*/true);  // pinned: the caching host allocator keeps it alive
  const int32_t* base = dev.data_ptr<int32_t>();
  const int32_t* dev_field[9];
  for (int k = 0; k < 9; ++k) dev_field[k] = base + (field[k] - host.data_ptr<int32_t>());
  const Prepared prep{dev_field[0], dev_field[1], dev_field[2], dev_field[3], dev_field[4],
                      dev_field[5], dev_field[6], dev_field[7], dev_field[8]};

  // The class sums in shared memory when they fit (opting in above 48 KiB), else in a global
  // workspace, one slot per block of a grid bounded to what the device holds at once.
  const int threads = threads_for(n);
  const int64_t items = n_layers * n;
  const int64_t shared_bytes = (fixed_doubles(threads) + max_classes) * static_cast<int64_t>(sizeof(double));
  const bool in_shared = shared_bytes <= shared_memory_budget();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = static_cast<int64_t>(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / threads);
  const int64_t blocks = std::min<int64_t>(items, in_shared ? std::numeric_limits<int32_t>::max() : resident);
  at::Tensor workspace;
  if (!in_shared) workspace = at::empty({blocks, max_classes}, d.options().dtype(at::kDouble));
  const int64_t launch_bytes = in_shared ? shared_bytes : fixed_doubles(threads) * static_cast<int64_t>(sizeof(double));
  at::Tensor scores = at::empty({n_layers, n_parts, n}, d.options().dtype(at::kDouble));
  const at::Tensor dc = d.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dc.scalar_type(), "silhouette_cuda", [&] {
    allow_dynamic_shared_memory(silhouette_rows_kernel<scalar_t>, launch_bytes);
    silhouette_rows_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, static_cast<size_t>(launch_bytes),
                                       stream>>>(dc.data_ptr<scalar_t>(), n_layers, n_parts, n, prep, max_classes,
                                                 in_shared ? nullptr : workspace.data_ptr<double>(),
                                                 scores.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t partitions = n_layers * n_parts;
  constexpr int kMeanThreads = 128;
  silhouette_mean_kernel<<<static_cast<unsigned int>((partitions + kMeanThreads - 1) / kMeanThreads), kMeanThreads, 0,
                           stream>>>(scores.data_ptr<double>(), prep.n_labels, partitions, n, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("silhouette", &fedtreelora::silhouette_cuda);
}
