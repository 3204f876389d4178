// CPU kernel of fedtreelora::silhouette: the mean silhouette of M partitions under each of L
// distance matrices. One pass over d, row by row, sums every row's distances per class of the
// partitions' common refinement; every partition's cluster sums are sums of those (O(classes)), and
// a, b and s follow. O(N^2 + M N R) per layer for R refined classes (nested cuts of one tree: R = the
// finest cut's count), accumulated in double. The same pass checks d's contract (finite,
// non-negative, zero diagonal: silhouette_math.h), so the wrapper makes no scan of its own.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "nvtx_range.h"
#include "op_checks.h"
#include "silhouette_math.h"
#include "silhouette_partitions.h"

namespace fedtreelora {
namespace {

// The pass reads d row by row, each row once and in order (the memory floor: the prefetchers stream
// it, and the row sits in L1 while it is used twice). A row is first checked (finite, >= 0: one
// vectorised compare per entry), then summed per class of the refinement by walking the members of
// each class in increasing client order (a gather inside the row, in double with eight independent
// accumulators, so the adds do not wait on each other); every partition's cluster sums, a, b and s
// follow from the class sums. Rows are independent: blocks of rows are the work items.
constexpr int64_t kRowsPerItem = 32;

// Machine epsilon of the input dtype: the diagonal may be 100 of them from 0 (sklearn).
template <typename scalar_t>
double diagonal_tolerance() {
  return 100.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
}

// Whether every entry of the row is finite and >= 0 (the comparisons are false for NaN). 16-bit
// input is compared after the exact conversion to float.
template <typename scalar_t>
__attribute__((always_inline)) inline bool row_in_contract_impl(const scalar_t* row, int64_t n) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const T top = std::numeric_limits<T>::max();
  int ok = 1;
  for (int64_t j = 0; j < n; ++j) {
    const T v = static_cast<T>(row[j]);
    ok &= (v >= T(0)) & (v <= top);
  }
  return ok != 0;
}

// sums[r] = sum of row[j] over the members j of class r, in double: eight independent accumulators,
// so that the adds do not wait on each other's latency.
template <typename scalar_t>
__attribute__((always_inline)) inline void class_sums_impl(const scalar_t* __restrict__ row,
                                                           const int32_t* __restrict__ members,
                                                           const int64_t* __restrict__ start, int64_t n_classes,
                                                           double* __restrict__ sums) {
  for (int64_t r = 0; r < n_classes; ++r) {
    const int32_t* m = members + start[r];
    const int64_t count = start[r + 1] - start[r];
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t t = 0;
    for (; t + 8 <= count; t += 8)
      for (int u = 0; u < 8; ++u) s[u] += static_cast<double>(row[m[t + u]]);
    for (; t < count; ++t) s[0] += static_cast<double>(row[m[t]]);
    sums[r] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }
}

// Both compiled for AVX-512 and AVX2 as well as the baseline ISA, picked at load time (GCC's
// target_clones, x86-64 Linux): the check is a vector compare per 4, 8 or 16 entries.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FEDTREELORA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FEDTREELORA_CLONES
#endif
#define FEDTREELORA_ROW_KERNELS(scalar_t)                                                                       \
  FEDTREELORA_CLONES bool row_in_contract(const scalar_t* row, int64_t n) { return row_in_contract_impl(row, n); } \
  FEDTREELORA_CLONES void class_sums(const scalar_t* row, const int32_t* members, const int64_t* start,          \
                                     int64_t n_classes, double* sums) {                                          \
    class_sums_impl(row, members, start, n_classes, sums);                                                       \
  }
FEDTREELORA_ROW_KERNELS(float)
FEDTREELORA_ROW_KERNELS(double)
FEDTREELORA_ROW_KERNELS(at::Half)
FEDTREELORA_ROW_KERNELS(at::BFloat16)
#undef FEDTREELORA_ROW_KERNELS

// Silhouette of every client under every partition of every layer; false if d breaks its contract
// (or a row sum overflows), and the caller then finds and reports the entry.
template <typename scalar_t>
bool silhouette_rows(const scalar_t* d, const Partitions& p, const Refinement& f, int64_t n_layers, int64_t n_parts,
                     int64_t n, double* scores /* [L, M, N] */) {
  const int64_t blocks = (n + kRowsPerItem - 1) / kRowsPerItem;
  const double diag_tol = diagonal_tolerance<scalar_t>();
  std::atomic<bool> valid{true};
  at::parallel_for(0, n_layers * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> csum(n), sums(n);
    for (int64_t item = begin; item < end && valid; ++item) {
      const int64_t l = item / blocks, i0 = (item % blocks) * kRowsPerItem, i1 = std::min(n, i0 + kRowsPerItem);
      const int64_t n_classes = f.n_classes[l];
      const int32_t* members = f.members.data() + l * n;
      const int64_t* class_start = f.start.data() + l * (n + 1);
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = d + (l * n + i) * n;
        if (!row_in_contract(row, n) || !(static_cast<double>(row[i]) <= diag_tol)) {
          valid = false;
          break;  // the scores are not used: the caller raises
        }
        class_sums(row, members, class_start, n_classes, csum.data());
        double total = 0.0;
        for (int64_t r = 0; r < n_classes; ++r) total += csum[r];
        if (!std::isfinite(total)) {
          valid = false;
          break;
        }
        for (int64_t m = 0; m < n_parts; ++m) {
          const int64_t q = l * n_parts + m;
          const int64_t k = p.n_labels[q];
          if (!silhouette_defined(k, n)) continue;
          const int32_t* cluster_of = f.cluster.data() + q * n;
          const int64_t* start = p.start.data() + q * (n + 1);
          std::fill(sums.begin(), sums.begin() + k, 0.0);
          for (int64_t r = 0; r < n_classes; ++r) sums[cluster_of[r]] += csum[r];
          const int32_t own = p.label[q * n + i];
          double b = std::numeric_limits<double>::infinity();
          for (int64_t c = 0; c < k; ++c)
            if (c != own) b = std::min(b, sums[c] / static_cast<double>(start[c + 1] - start[c]));
          const int64_t own_size = start[own + 1] - start[own];
          const double a = sums[own] / static_cast<double>(std::max<int64_t>(own_size - 1, 1));
          scores[q * n + i] = silhouette_from_means(a, b, own_size);
        }
      }
    }
  });
  return valid;
}

// Called only after the pass found d outside its contract: the first offending entry, in [l, i, j]
// order, for the message.
template <typename scalar_t>
void report_violation(const scalar_t* d, int64_t n_layers, int64_t n) {
  const double diag_tol = diagonal_tolerance<scalar_t>();
  for (int64_t l = 0; l < n_layers; ++l)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(d[(l * n + i) * n + j]);
        TORCH_CHECK_VALUE(std::isfinite(v), "silhouette: d has a NaN or Inf entry at layer ", l, ", [", i, ", ", j, "]");
        TORCH_CHECK_VALUE(v >= 0, "silhouette: d has a negative distance at layer ", l, ", [", i, ", ", j, "]: ", v);
        TORCH_CHECK_VALUE(i != j || v <= diag_tol, "silhouette: d must have a zero diagonal (within 100 eps of its dtype, ",
                          diag_tol, ", as sklearn): layer ", l, ", d[", i, ", ", i, "] = ", v);
      }
  TORCH_CHECK_VALUE(false, "silhouette: the row sums of d overflow float64; scale d down");
}

at::Tensor silhouette_cpu(const at::Tensor& d, const at::Tensor& labels) {
  NvtxRange range("fedtreelora::silhouette");
  TORCH_CHECK_VALUE(d.device().is_cpu() && labels.device().is_cpu(), "silhouette: d and labels must be CPU tensors");
  check_silhouette_args(d, labels);
  const int64_t n_layers = d.size(0), n_parts = labels.size(1), n = d.size(1);
  const at::Tensor dc = d.contiguous();
  const Partitions p = compact_partitions(labels.contiguous(), n);
  const Refinement f = refine_partitions(p, n_layers, n_parts, n);
  std::vector<double> scores(n_layers * n_parts * n, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dc.scalar_type(), "silhouette_cpu", [&] {
    if (!silhouette_rows(dc.data_ptr<scalar_t>(), p, f, n_layers, n_parts, n, scores.data()))
      report_violation(dc.data_ptr<scalar_t>(), n_layers, n);
  });
  at::Tensor out = at::empty({n_layers, n_parts}, d.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t q = 0; q < n_layers * n_parts; ++q) {
    if (!silhouette_defined(p.n_labels[q], n)) {
      o[q] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    double total = 0.0;  // summed in client order: the result does not depend on the thread count
    for (int64_t i = 0; i < n; ++i) total += scores[q * n + i];
    o[q] = static_cast<float>(total / static_cast<double>(n));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) { m.impl("silhouette", &silhouette_cpu); }

}  // namespace fedtreelora
