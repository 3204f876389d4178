// CPU kernel of fedtreelora::silhouette: the mean silhouette of M partitions under each of L
// distance matrices. Per client row, one pass sums its distances per class of the partitions' common
// refinement (O(N)); every partition's cluster sums are sums of those (O(classes)), and a, b and s
// follow. O(N^2 + M N R) per layer for R refined classes (nested cuts of one tree: R = the finest
// cut's count), accumulated in double. The same pass checks that d is finite.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "nvtx_range.h"
#include "op_checks.h"
#include "silhouette_math.h"

namespace fedtreelora {
namespace {

// Labels renumbered 0..k-1 per partition (they may be any values in [0, N)), and the cluster sizes as
// prefix sums: cluster c holds start[c + 1] - start[c] clients.
struct Partitions {
  std::vector<int32_t> label;     // [L, M, N] compact labels
  std::vector<int64_t> start;     // [L, M, N + 1] (first n_labels + 1 entries used)
  std::vector<int64_t> n_labels;  // [L, M]
};

Partitions compact_partitions(const at::Tensor& labels, int64_t n) {
  const int64_t parts = labels.size(0) * labels.size(1);
  const int64_t* raw = labels.data_ptr<int64_t>();
  Partitions p{std::vector<int32_t>(parts * n), std::vector<int64_t>(parts * (n + 1), 0), std::vector<int64_t>(parts)};
  std::vector<int32_t> slot(n);
  for (int64_t q = 0; q < parts; ++q) {
    std::fill(slot.begin(), slot.end(), -1);
    int32_t k = 0;
    int32_t* label = p.label.data() + q * n;
    int64_t* start = p.start.data() + q * (n + 1);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = raw[q * n + j];
      TORCH_CHECK_VALUE(v >= 0 && v < n, "silhouette: labels must lie in [0, N) with N=", n, ", found ", v,
                        " at [", q / labels.size(1), ", ", q % labels.size(1), ", ", j, "]");
      if (slot[v] < 0) slot[v] = k++;
      label[j] = slot[v];
      ++start[label[j] + 1];
    }
    for (int32_t c = 0; c < k; ++c) start[c + 1] += start[c];
    p.n_labels[q] = k;
  }
  return p;
}

// The common refinement of one layer's M partitions: clients with the same label in every partition
// share a class. A cluster's distance sums are the sums of its classes', so a block of rows is summed
// once per layer whatever M is.
struct Refinement {
  std::vector<int32_t> members;    // [L, N] clients ordered by class
  std::vector<int64_t> start;      // [L, N + 1] class r's members are members[start[r] : start[r + 1]]
  std::vector<int64_t> n_classes;  // [L]
  std::vector<int32_t> cluster;    // [L, M, N] compact cluster in partition m of class r (r < n_classes)
};

Refinement refine_partitions(const Partitions& p, int64_t n_layers, int64_t n_parts, int64_t n) {
  Refinement f{std::vector<int32_t>(n_layers * n), std::vector<int64_t>(n_layers * (n + 1), 0),
               std::vector<int64_t>(n_layers, n > 0 ? 1 : 0), std::vector<int32_t>(n_layers * n_parts * n, 0)};
  std::vector<int32_t> cls(n), renumber(n), order(n), mark, id;
  std::vector<int64_t> at;
  for (int64_t l = 0; l < n_layers; ++l) {
    std::fill(cls.begin(), cls.end(), 0);
    int64_t count = n > 0 ? 1 : 0;
    for (int64_t m = 0; m < n_parts; ++m) {  // split every class by the labels of partition m
      const int32_t* lab = p.label.data() + (l * n_parts + m) * n;
      at.assign(count + 1, 0);               // clients ordered by class (counting sort) ...
      for (int64_t j = 0; j < n; ++j) ++at[cls[j] + 1];
      for (int64_t r = 0; r < count; ++r) at[r + 1] += at[r];
      for (int64_t j = 0; j < n; ++j) order[at[cls[j]]++] = static_cast<int32_t>(j);
      mark.assign(p.n_labels[l * n_parts + m], -1);  // ... so a label is new to a class when its mark
      id.resize(mark.size());                        // is not that class: O(N + k) memory, not O(N k)
      int32_t next = 0;
      for (int64_t t = 0; t < n; ++t) {
        const int32_t j = order[t], c = cls[j], v = lab[j];
        if (mark[v] != c) mark[v] = c, id[v] = next++;
        renumber[j] = id[v];
      }
      cls.swap(renumber);
      count = next;
    }
    int64_t* start = f.start.data() + l * (n + 1);
    for (int64_t j = 0; j < n; ++j) ++start[cls[j] + 1];
    for (int64_t r = 0; r < count; ++r) start[r + 1] += start[r];
    std::vector<int64_t> fill(start, start + count);
    for (int64_t j = 0; j < n; ++j) f.members[l * n + fill[cls[j]]++] = static_cast<int32_t>(j);
    for (int64_t m = 0; m < n_parts; ++m) {
      const int32_t* lab = p.label.data() + (l * n_parts + m) * n;
      for (int64_t j = 0; j < n; ++j) f.cluster[(l * n_parts + m) * n + cls[j]] = lab[j];
    }
    f.n_classes[l] = count;
  }
  return f;
}

// Rows are scored in blocks of kRows: the block is transposed once into a [N, kRows] double tile, so
// that a cluster's sums are kRows running sums over its members' tile rows, kept in registers (no
// scatter through memory), and every partition of the layer reuses the tile from cache.
constexpr int64_t kRows = 16;

// tile[j, r] = rows[r, j] for r < n_rows, in 16-column steps so that reads and writes stay in L1.
// Returns false when a value is NaN or +-Inf (checked here: d is read once).
template <typename scalar_t>
bool transpose_rows(const scalar_t* __restrict__ rows, int64_t n, int64_t n_rows, double* __restrict__ tile) {
  bool finite = true;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t j1 = std::min(n, j0 + 16);
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t j = j0; j < j1; ++j) {
        const double v = static_cast<double>(rows[r * n + j]);
        finite &= std::isfinite(v);
        tile[j * kRows + r] = v;
      }
  }
  return finite;
}

// out[r] = sum of tile[j, r] over the given clients j; the sums stay in registers.
inline void sum_tile_rows(const double* __restrict__ tile, const int32_t* __restrict__ clients, int64_t count,
                          double* __restrict__ out) {
  double acc[kRows] = {};
  for (int64_t t = 0; t < count; ++t) {
    const double* row = tile + clients[t] * kRows;
    for (int64_t r = 0; r < kRows; ++r) acc[r] += row[r];
  }
  for (int64_t r = 0; r < kRows; ++r) out[r] = acc[r];
}

template <typename scalar_t>
bool silhouette_rows(const scalar_t* d, const Partitions& p, const Refinement& f, int64_t n_layers, int64_t n_parts,
                     int64_t n, double* scores /* [L, M, N] */) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  std::atomic<bool> finite{true};
  at::parallel_for(0, n_layers * blocks, 1, [&](int64_t begin, int64_t end) {
    // [N, kRows] distances; [classes, kRows] and [clusters, kRows] sums
    std::vector<double> tile(n * kRows), class_sums(n * kRows), sums(n * kRows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = item / blocks;
      const int64_t i0 = (item % blocks) * kRows;
      const int64_t rows = std::min(kRows, n - i0);
      // A last, partial block leaves stale values in lanes r >= rows: they are summed but never read.
      if (!transpose_rows(d + (l * n + i0) * n, n, rows, tile.data())) finite = false;
      const int64_t n_classes = f.n_classes[l];
      const int64_t* class_start = f.start.data() + l * (n + 1);
      for (int64_t r = 0; r < n_classes; ++r)
        sum_tile_rows(tile.data(), f.members.data() + l * n + class_start[r], class_start[r + 1] - class_start[r],
                      class_sums.data() + r * kRows);
      for (int64_t m = 0; m < n_parts; ++m) {
        const int64_t q = l * n_parts + m;
        const int64_t k = p.n_labels[q];
        if (!silhouette_defined(k, n)) continue;
        const int32_t* lab = p.label.data() + q * n;
        const int32_t* cluster_of = f.cluster.data() + q * n;
        const int64_t* start = p.start.data() + q * (n + 1);
        std::fill(sums.begin(), sums.begin() + k * kRows, 0.0);
        for (int64_t r = 0; r < n_classes; ++r) {
          double* to = sums.data() + cluster_of[r] * kRows;
          const double* from = class_sums.data() + r * kRows;
          for (int64_t lane = 0; lane < kRows; ++lane) to[lane] += from[lane];
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t own = lab[i0 + r];
          double b = std::numeric_limits<double>::infinity();
          for (int64_t c = 0; c < k; ++c)
            if (c != own) b = std::min(b, sums[c * kRows + r] / static_cast<double>(start[c + 1] - start[c]));
          const int64_t own_size = start[own + 1] - start[own];
          const double a = sums[own * kRows + r] / static_cast<double>(std::max<int64_t>(own_size - 1, 1));
          scores[q * n + i0 + r] = silhouette_from_means(a, b, own_size);
        }
      }
    }
  });
  return finite;
}

// Called only after the pass found a non-finite value: the first one, in [l, i, j] order, for the message.
template <typename scalar_t>
void report_nonfinite(const scalar_t* d, int64_t n_layers, int64_t n) {
  for (int64_t l = 0; l < n_layers; ++l)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(d[(l * n + i) * n + j])),
                          "silhouette: d has a NaN or Inf entry at layer ", l, ", [", i, ", ", j, "]");
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
      report_nonfinite(dc.data_ptr<scalar_t>(), n_layers, n);
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
