// CPU kernel of fedtreelora::silhouette: the mean silhouette of M partitions under each of L
// distance matrices. One pass over d sums every row's distances per class of the partitions' common
// refinement; every partition's cluster sums are sums of those (O(classes)), and a, b and s follow. O(N^2 + M N R) per layer for R refined classes (nested cuts of one tree: R = the finest
// cut's count), accumulated in double. The same pass checks d's contract (finite, non-negative, zero
// diagonal, symmetric up to round-off: silhouette_math.h), so the wrapper makes no scan of its own.
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
#include "simd.h"

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

// One pass over each layer in 16 x 16 tiles. The tiles (I, J) and (J, I), I <= J, are read together
// (every entry of d once), both transposed in registers: the transpose of (I, J) is compared with
// (J, I) for symmetry on the spot, and each transpose adds its columns to the per-class sums of the
// tile's rows, 16 rows at a time in double lanes (no scatter). A layer's class sums are [N, classes];
// every partition's cluster sums, a, b and s follow per block of 16 rows. The same pass checks the
// rest of d's contract (finite, non-negative, diagonal: silhouette_math.h), so nothing else scans d.
// Tiles are float for 32- and 16-bit input (exact), double for float64.
constexpr int64_t kTile = 16;

template <typename scalar_t>
using tile_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Machine epsilon of the input dtype: the diagonal may be 100 of them from 0 (sklearn).
template <typename scalar_t>
double diagonal_tolerance() {
  return 100.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
}

template <typename T>
struct Tile {
  T v[kTile][kTile];
};

// t := d[r0 : r0 + rows, c0 : c0 + cols] of a layer, zero-padded to 16 x 16.
template <typename scalar_t, typename T>
__attribute__((always_inline)) inline void load_tile(const scalar_t* layer, int64_t n, int64_t r0, int64_t c0,
                                                     int64_t rows, int64_t cols, Tile<T>& t) {
  for (int64_t a = 0; a < kTile; ++a) {
    const scalar_t* src = layer + (r0 + a) * n + c0;
    if (a < rows && cols == kTile) {
      for (int64_t b = 0; b < kTile; ++b) t.v[a][b] = static_cast<T>(src[b]);
    } else {
      for (int64_t b = 0; b < kTile; ++b) t.v[a][b] = a < rows && b < cols ? static_cast<T>(src[b]) : T(0);
    }
  }
}

// out := transpose of in (four 8 x 8 register transposes for float).
template <typename T>
__attribute__((always_inline)) inline void transpose_tile(const Tile<T>& in, Tile<T>& out) {
#if FEDTREELORA_SIMD
  if constexpr (std::is_same_v<T, float>) {
    for (int bi = 0; bi < kTile; bi += 8)
      for (int bj = 0; bj < kTile; bj += 8) {
        simd::f8 r[8];
        for (int k = 0; k < 8; ++k) r[k] = simd::load8(&in.v[bi + k][bj]);
        simd::transpose8(r);
        for (int k = 0; k < 8; ++k) simd::store8(&out.v[bj + k][bi], r[k]);
      }
    return;
  }
#endif
  for (int a = 0; a < kTile; ++a)
    for (int b = 0; b < kTile; ++b) out.v[a][b] = in.v[b][a];
}

// Whether x[a][b] and y[a][b] agree up to round-off for every (a, b), and none is negative (the
// comparisons are false for NaN, which therefore fails too).
template <typename T>
__attribute__((always_inline)) inline bool tiles_agree(const Tile<T>& x, const Tile<T>& y) {
#if FEDTREELORA_SIMD
  if constexpr (std::is_same_v<T, float>) {
    simd::i8 all = simd::i8{} - 1;
    for (int a = 0; a < kTile; ++a)
      for (int b = 0; b < kTile; b += 8) all &= simd::agree8(simd::load8(&x.v[a][b]), simd::load8(&y.v[a][b]));
    bool ok = true;
    for (int k = 0; k < 8; ++k) ok &= all[k] != 0;
    return ok;
  }
#endif
  bool ok = true;
  for (int a = 0; a < kTile; ++a)
    for (int b = 0; b < kTile; ++b) {
      const T p = x.v[a][b], q = y.v[a][b];
      ok &= (p >= T(0)) & (q >= T(0)) & symmetric_within_roundoff(p, q);
    }
  return ok;
}

// sums[cls[c0 + a], lane] += t[a][lane] for the tile's `cols` columns: a transposed tile adds its
// rows' distances to each column's class, 16 rows in 16 lanes.
template <typename T>
__attribute__((always_inline)) inline void add_columns(const Tile<T>& t, const int32_t* cls, int64_t c0, int64_t cols,
                                                       double* __restrict__ sums) {
  for (int64_t a = 0; a < cols; ++a) {
    double* to = sums + static_cast<int64_t>(cls[c0 + a]) * kTile;
#if FEDTREELORA_SIMD
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t lane = 0; lane < kTile; lane += 4) simd::add4_widened(to + lane, &t.v[a][lane]);
      continue;
    }
#endif
    for (int64_t lane = 0; lane < kTile; ++lane) to[lane] += static_cast<double>(t.v[a][lane]);
  }
}

constexpr int64_t kAhead = 8;

// Both cache lines that a tile row of `count` values may straddle.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t count) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
  __builtin_prefetch(p + count - 1);
#else
  (void)p, (void)count;
#endif
}

// The pass over one layer: class_sums [blocks, classes, 16] (zeroed by the caller) gets the sum of
// d[i, j] over the clients j of each class, for every row i. Returns false if d breaks its contract
// in this layer (or a sum overflows); the caller then finds and reports the entry.
template <typename scalar_t>
__attribute__((always_inline)) inline bool layer_pass(const scalar_t* layer, int64_t n, const int32_t* cls,
                                                      int64_t n_classes, double* class_sums) {
  using T = tile_t<scalar_t>;
  const int64_t blocks = (n + kTile - 1) / kTile;
  const double diag_tol = diagonal_tolerance<scalar_t>();
  const int64_t stride = n_classes * kTile;  // one block's class sums
  bool ok = true;
  Tile<T> a, b, at, bt;
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t i0 = bi * kTile, rows_i = std::min(kTile, n - i0);
    for (int64_t bj = bi; bj < blocks; ++bj) {
      const int64_t j0 = bj * kTile, rows_j = std::min(kTile, n - j0);
      // The tiles are 16 short rows each, far apart: ask for the ones kAhead steps on now, so that
      // their memory latency overlaps this step's work (the hardware prefetchers do not see it coming).
      if (bj + kAhead < blocks) {
        const int64_t ahead = (bj + kAhead) * kTile, rows_ahead = std::min(kTile, n - ahead);
        for (int64_t k = 0; k < rows_i; ++k) prefetch_row(layer + (i0 + k) * n + ahead, rows_ahead);
        for (int64_t k = 0; k < rows_ahead; ++k) prefetch_row(layer + (ahead + k) * n + i0, rows_i);
      }
      load_tile(layer, n, i0, j0, rows_i, rows_j, a);  // rows of block i, columns of block j
      transpose_tile(a, at);
      if (bj == bi) {
        ok &= tiles_agree(at, a);
        for (int64_t k = 0; k < rows_i; ++k) {
          const double v = static_cast<double>(a.v[k][k]);
          ok &= (v < 0 ? -v : v) <= diag_tol;
        }
        add_columns(at, cls, j0, rows_j, class_sums + bi * stride);
        continue;
      }
      load_tile(layer, n, j0, i0, rows_j, rows_i, b);  // its mirror
      transpose_tile(b, bt);
      ok &= tiles_agree(at, b);
      add_columns(at, cls, j0, rows_j, class_sums + bi * stride);
      add_columns(bt, cls, i0, rows_i, class_sums + bj * stride);
    }
  }
  // Every client is in one class: a NaN or Inf anywhere in a row makes its total non-finite.
  for (int64_t bi = 0; bi < blocks; ++bi)
    for (int64_t lane = 0; lane < kTile; ++lane) {
      double total = 0.0;
      for (int64_t c = 0; c < n_classes; ++c) total += class_sums[bi * stride + c * kTile + lane];
      ok &= std::isfinite(total);
    }
  return ok;
}

// The pass compiled for AVX2 as well as the baseline ISA, picked at load time (GCC's target_clones,
// x86-64 Linux); one plain function elsewhere.
#if FEDTREELORA_SIMD && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FEDTREELORA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FEDTREELORA_CLONES
#endif
#define FEDTREELORA_LAYER_PASS(scalar_t, name)                                                                \
  FEDTREELORA_CLONES bool name(const scalar_t* layer, int64_t n, const int32_t* cls, int64_t n_classes,      \
                               double* class_sums) {                                                          \
    return layer_pass(layer, n, cls, n_classes, class_sums);                                                  \
  }
FEDTREELORA_LAYER_PASS(float, layer_pass_float)
FEDTREELORA_LAYER_PASS(double, layer_pass_double)
FEDTREELORA_LAYER_PASS(at::Half, layer_pass_half)
FEDTREELORA_LAYER_PASS(at::BFloat16, layer_pass_bfloat16)
#undef FEDTREELORA_LAYER_PASS

template <typename scalar_t>
bool run_layer_pass(const scalar_t* layer, int64_t n, const int32_t* cls, int64_t n_classes, double* class_sums) {
  if constexpr (std::is_same_v<scalar_t, float>) return layer_pass_float(layer, n, cls, n_classes, class_sums);
  else if constexpr (std::is_same_v<scalar_t, double>) return layer_pass_double(layer, n, cls, n_classes, class_sums);
  else if constexpr (std::is_same_v<scalar_t, at::Half>) return layer_pass_half(layer, n, cls, n_classes, class_sums);
  else return layer_pass_bfloat16(layer, n, cls, n_classes, class_sums);
}

// Layers are the work items (a layer's pass adds into the class sums of both tiles' rows). Scratch per
// thread: [N, classes] doubles, at most twice a float32 layer of d.
template <typename scalar_t>
bool silhouette_rows(const scalar_t* d, const Partitions& p, const Refinement& f, int64_t n_layers, int64_t n_parts,
                     int64_t n, double* scores /* [L, M, N] */) {
  const int64_t blocks = (n + kTile - 1) / kTile;
  std::atomic<bool> valid{true};
  at::parallel_for(0, n_layers, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> class_sums, sums(n * kTile);
    std::vector<int32_t> cls(n);
    for (int64_t l = begin; l < end; ++l) {
      const int64_t n_classes = f.n_classes[l];
      const int64_t* class_start = f.start.data() + l * (n + 1);
      for (int64_t r = 0; r < n_classes; ++r)
        for (int64_t t = class_start[r]; t < class_start[r + 1]; ++t) cls[f.members[l * n + t]] = static_cast<int32_t>(r);
      class_sums.assign(blocks * n_classes * kTile, 0.0);
      if (!run_layer_pass(d + l * n * n, n, cls.data(), n_classes, class_sums.data())) {
        valid = false;
        continue;  // the scores are not used: the caller raises
      }
      for (int64_t bi = 0; bi < blocks; ++bi) {
        const int64_t i0 = bi * kTile, rows = std::min(kTile, n - i0);
        const double* block_sums = class_sums.data() + bi * n_classes * kTile;
        for (int64_t m = 0; m < n_parts; ++m) {
          const int64_t q = l * n_parts + m;
          const int64_t k = p.n_labels[q];
          if (!silhouette_defined(k, n)) continue;
          const int32_t* lab = p.label.data() + q * n;
          const int32_t* cluster_of = f.cluster.data() + q * n;
          const int64_t* start = p.start.data() + q * (n + 1);
          std::fill(sums.begin(), sums.begin() + k * kTile, 0.0);
          for (int64_t r = 0; r < n_classes; ++r) {
            double* to = sums.data() + cluster_of[r] * kTile;
            const double* from = block_sums + r * kTile;
            for (int64_t lane = 0; lane < kTile; ++lane) to[lane] += from[lane];
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int32_t own = lab[i0 + r];
            double b = std::numeric_limits<double>::infinity();
            for (int64_t c = 0; c < k; ++c)
              if (c != own) b = std::min(b, sums[c * kTile + r] / static_cast<double>(start[c + 1] - start[c]));
            const int64_t own_size = start[own + 1] - start[own];
            const double a = sums[own * kTile + r] / static_cast<double>(std::max<int64_t>(own_size - 1, 1));
            scores[q * n + i0 + r] = silhouette_from_means(a, b, own_size);
          }
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
  using T = tile_t<scalar_t>;
  const double diag_tol = diagonal_tolerance<scalar_t>();
  for (int64_t l = 0; l < n_layers; ++l)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(d[(l * n + i) * n + j]);
        TORCH_CHECK_VALUE(std::isfinite(v), "silhouette: d has a NaN or Inf entry at layer ", l, ", [", i, ", ", j, "]");
        TORCH_CHECK_VALUE(v >= 0, "silhouette: d has a negative distance at layer ", l, ", [", i, ", ", j, "]: ", v);
        TORCH_CHECK_VALUE(i != j || v <= diag_tol, "silhouette: d must have a zero diagonal (within 100 eps of its dtype, ",
                          diag_tol, ", as sklearn): layer ", l, ", d[", i, ", ", i, "] = ", v);
        const T a = static_cast<T>(d[(l * n + i) * n + j]), b = static_cast<T>(d[(l * n + j) * n + i]);
        TORCH_CHECK_VALUE(symmetric_within_roundoff(a, b), "silhouette: d must be symmetric up to round-off ",
                          "(|d[i, j] - d[j, i]| <= 1e-10 + 1e-5 min(d[i, j], d[j, i]), sklearn's check_symmetric): layer ",
                          l, ", d[", i, ", ", j, "] = ", static_cast<double>(a), " but d[", j, ", ", i, "] = ",
                          static_cast<double>(b));
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
