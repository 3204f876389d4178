// linkage on CPU: agglomerative clustering of a square distance matrix into scipy's Z.
//
// The algorithms are scipy's (scipy/cluster/_hierarchy.pyx), step for step, so that Z is equal to
// scipy.cluster.hierarchy.linkage(squareform(d), method) to the bit: the minimum spanning tree
// (Prim) for single linkage, the nearest-neighbour chain for the others, then a stable sort of the
// merges by height and a relabelling with union-find. nn_chain works on a full square copy kept
// symmetric, not on scipy's condensed triangle: the nearest-neighbour scans, most of the time, then
// read one contiguous row (in the condensed form half of each scan is a column, a cache miss per
// element), at the price of a strided column write per update and twice the memory (and the bytes
// to copy): at N=4000 the chain runs 1.4x faster, the op 1.1x. Prim reads d's rows directly. Both
// visit candidates in increasing index order with scipy's strict '<', so ties break as scipy's do.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <new>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "linkage_update.h"
#include "nvtx_range.h"

namespace fedtreelora {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The working copy of d for nn_chain, [N, N] row-major. nn_chain writes a column per merge, one
// row apart per element: on Linux the buffer asks for transparent huge pages, so that those writes
// do not also miss the TLB.
struct Square {
  std::unique_ptr<double, void (*)(void*)> buffer{nullptr, std::free};
  double* data = nullptr;

  explicit Square(int64_t n) {
    constexpr size_t kHugePage = size_t{2} << 20;
    size_t bytes = std::max<size_t>(sizeof(double) * static_cast<size_t>(n) * static_cast<size_t>(n), sizeof(double));
    void* p = nullptr;
#if defined(__linux__)
    bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (posix_memalign(&p, kHugePage, bytes) != 0) p = nullptr;
    if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);  // a hint; refusal is harmless
#else
    p = std::malloc(bytes);
#endif
    if (p == nullptr) throw std::bad_alloc();
    buffer.reset(static_cast<double*>(p));
    data = buffer.get();
  }
};

// Checks what the kernels rely on: zero diagonal, finite, non-negative and exactly symmetric (the
// Python wrapper checks the same with more context; this keeps direct op calls safe), and, when
// given `copy`, fills it with d on the way (one read of d), its diagonal set to +inf so that a
// cluster is never its own nearest neighbour. Square tiles, so that the transposed half stays in cache.
void check_distance_matrix(const double* d, int64_t n, Square* copy) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(d[i * n + i] == 0.0, "linkage: d must have a zero diagonal, d[", i, ", ", i, "] = ", d[i * n + i]);
  }
  // Work items are the tiles on and above the diagonal, so that threads get equal shares.
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> items;
  items.reserve(tiles * (tiles + 1) / 2);
  for (int64_t bi = 0; bi < tiles; ++bi) {
    for (int64_t bj = bi; bj < tiles; ++bj) items.emplace_back(bi * kTile, bj * kTile);
  }
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [i0, j0] = items[t];
      const int64_t i1 = std::min(n, i0 + kTile), j1 = std::min(n, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j_begin = std::max(j0, i + 1);
        bool ok = true;
        for (int64_t j = j_begin; j < j1; ++j) {
          const double v = d[i * n + j];
          // v >= 0 is false for NaN; v < inf rules out +inf.
          ok &= (v >= 0.0) & (v < kInf) & (v == d[j * n + i]);
        }
        if (copy != nullptr && j_begin < j1) std::copy(d + i * n + j_begin, d + i * n + j1, copy->data + i * n + j_begin);
        if (!ok) {
          int64_t seen = first_bad.load();
          while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
          }
        }
      }
      if (copy != nullptr) {  // the tile's mirror below the diagonal, row by row, and the diagonal
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t i_end = std::min(i1, j);
          if (i0 < i_end) std::copy(d + j * n + i0, d + j * n + i_end, copy->data + j * n + i0);
          if (i0 == j0) copy->data[j * n + j] = kInf;
        }
      }
    }
  });
  const int64_t i = first_bad.load();
  if (i == std::numeric_limits<int64_t>::max()) return;
  for (int64_t j = i + 1; j < n; ++j) {
    const double v = d[i * n + j], w = d[j * n + i];
    TORCH_CHECK_VALUE(std::isfinite(v) && std::isfinite(w), "linkage: d has a NaN or Inf entry at [", i, ", ", j, "]");
    TORCH_CHECK_VALUE(v >= 0.0, "linkage: d has a negative distance at [", i, ", ", j, "]: ", v);
    TORCH_CHECK_VALUE(v == w, "linkage: d must be exactly symmetric, d[", i, ", ", j, "] = ", v, " != d[", j, ", ", i, "] = ", w);
  }
}

// One merge as the algorithms find it: two leaves standing for the merged clusters, and the height.
struct Merge {
  int64_t a, b;
  double height;
};

// The live clusters in increasing index order (scipy visits them in that order, which decides
// ties); removal shifts the tail, O(n) like the rest of a merge step.
struct LiveList {
  std::vector<int64_t> ids;

  explicit LiveList(int64_t n) : ids(n) { std::iota(ids.begin(), ids.end(), 0); }
  void remove(int64_t i) { ids.erase(std::lower_bound(ids.begin(), ids.end(), i)); }
};

// scipy's mst_single_linkage: Prim's algorithm from node 0; row k joins the last node added (x)
// with the nearest node outside the tree (y). The relabelling step turns this into the dendrogram.
// d is the full symmetric matrix, read one row at a time.
std::vector<Merge> mst_single_linkage(const double* d, int64_t n) {
  std::vector<Merge> merges(n - 1);
  std::vector<double> nearest(n, kInf);  // distance of each outside node to the tree
  LiveList outside(n);
  int64_t x = 0, y = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    outside.remove(x);
    const double* dx = d + x * n;
    double current_min = kInf;
    for (const int64_t i : outside.ids) {
      if (nearest[i] > dx[i]) nearest[i] = dx[i];
      if (nearest[i] < current_min) {
        y = i;
        current_min = nearest[i];
      }
    }
    merges[k] = {x, y, current_min};
    x = y;
  }
  return merges;
}

// Updates write column y, a whole row apart per element: prefetch a few ahead.
constexpr size_t kPrefetchAhead = 32;
inline void prefetch_for_write(const double* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1);
#else
  (void)p;
#endif
}

// The nearest neighbour of x: the first i in increasing order with row[i] < bound and smaller than
// all before it (scipy's scan with '<', NaN never chosen), or -1. Dead clusters are skipped through
// `dead` (+inf for them, 0 for the live: row[i] + 0 is row[i] exactly), so that the scan reads the
// row contiguously, eight lanes at a time on AVX-512, each lane keeping its first minimum.
int64_t nearest_scalar(const double* row, const double* dead, int64_t n, double bound, double* best) {
  int64_t y = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double dist = row[i] + dead[i];
    if (dist < bound) {
      bound = dist;
      y = i;
    }
  }
  *best = bound;
  return y;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12's intrinsics headers trip it (_mm512_undefined_pd)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
__attribute__((target("avx512f"))) int64_t nearest_avx512(const double* row, const double* dead, int64_t n,
                                                          double bound, double* best) {
  const __m512d inf = _mm512_set1_pd(kInf);
  __m512d lane_min = _mm512_set1_pd(bound);
  __m512i lane_index = _mm512_set1_epi64(-1);
  __m512i index = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i step = _mm512_set1_epi64(8);
  for (int64_t i = 0; i < n; i += 8) {
    const __mmask8 lanes = n - i >= 8 ? 0xff : static_cast<__mmask8>((1u << (n - i)) - 1);
    const __m512d dist = _mm512_add_pd(_mm512_mask_loadu_pd(inf, lanes, row + i), _mm512_mask_loadu_pd(inf, lanes, dead + i));
    const __mmask8 smaller = _mm512_cmp_pd_mask(dist, lane_min, _CMP_LT_OQ);
    lane_min = _mm512_mask_mov_pd(lane_min, smaller, dist);
    lane_index = _mm512_mask_mov_epi64(lane_index, smaller, index);
    index = _mm512_add_epi64(index, step);
  }
  const double m = _mm512_reduce_min_pd(lane_min);
  *best = m < bound ? m : bound;
  if (!(m < bound)) return -1;
  // The first index overall is the smallest among the lanes that reached the minimum.
  const __mmask8 at_min = _mm512_cmp_pd_mask(lane_min, _mm512_set1_pd(m), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi64(at_min, lane_index);
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif

int64_t nearest(const double* row, const double* dead, int64_t n, double bound, double* best) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 ? nearest_avx512(row, dead, n, bound, best) : nearest_scalar(row, dead, n, bound, best);
}
#else
int64_t nearest(const double* row, const double* dead, int64_t n, double bound, double* best) {
  return nearest_scalar(row, dead, n, bound, best);
}
#endif

// scipy's nn_chain on the square copy W, which it overwrites: row and column y become the distances
// of the union of x and y. The chain prefers its previous element on ties so that it cannot cycle.
template <LinkageMethod M>
std::vector<Merge> nn_chain(double* W, int64_t n) {
  std::vector<Merge> merges(n - 1);
  std::vector<int> size(n, 1);
  std::vector<double> dead(n, 0.0);
  LiveList live(n);
  std::vector<int64_t> chain;
  chain.reserve(n);

  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain.empty()) chain.push_back(live.ids.front());
    int64_t x, y;
    double current_min;
    while (true) {
      x = chain.back();
      const double* wx = W + x * n;
      const int64_t previous = chain.size() > 1 ? chain[chain.size() - 2] : -1;
      // scipy starts from the previous element, then takes any strictly nearer one.
      const int64_t nearer = nearest(wx, dead.data(), n, previous >= 0 ? wx[previous] : kInf, &current_min);
      y = nearer >= 0 ? nearer : previous;
      // Only reachable when every distance from x is NaN (or +inf): ward squares distances, and above
      // ~1e154 the squares overflow (inf - inf). Mutual nearest neighbours keep ward's sqrt argument >= 0.
      TORCH_CHECK_VALUE(y >= 0, "linkage: the distances overflowed to NaN in the Lance-Williams updates (cluster of point ",
                        x, "); scale d down");
      if (y == previous) break;
      chain.push_back(y);
    }
    chain.resize(chain.size() - 2);
    if (x > y) std::swap(x, y);  // fastcluster's convention, kept by scipy
    const int nx = size[x], ny = size[y];
    merges[k] = {x, y, current_min};
    size[x] = 0;
    size[y] = nx + ny;
    live.remove(x);
    dead[x] = kInf;

    // d(i, x u y) for every live i != y, into row y (contiguous) and column y (strided).
    const int64_t* ids = live.ids.data();
    const size_t count = live.ids.size();
    const double* wx = W + x * n;
    double* wy = W + y * n;
    for (size_t p = 0; p < count; ++p) {
      if (p + kPrefetchAhead < count) prefetch_for_write(W + ids[p + kPrefetchAhead] * n + y);
      const int64_t i = ids[p];
      if (i == y) continue;
      const double v = linkage_update<M>(wx[i], wy[i], current_min, nx, ny, size[i]);
      wy[i] = v;
      W[i * n + y] = v;
    }
  }
  return merges;
}

// scipy's LinkageUnionFind: cluster ids in order of formation.
struct UnionFind {
  std::vector<int64_t> parent, size;
  int64_t next_label;

  explicit UnionFind(int64_t n) : parent(2 * n - 1), size(2 * n - 1, 1), next_label(n) {
    std::iota(parent.begin(), parent.end(), 0);
  }
  int64_t merge(int64_t x, int64_t y) {
    parent[x] = parent[y] = next_label;
    size[next_label] = size[x] + size[y];
    return size[next_label++];
  }
  int64_t find(int64_t x) {
    int64_t root = x;
    while (parent[root] != root) root = parent[root];
    while (parent[x] != root) {  // path compression
      const int64_t up = parent[x];
      parent[x] = root;
      x = up;
    }
    return root;
  }
};

// Stable sort by height (numpy's mergesort argsort), then scipy's `label`: ids and counts.
at::Tensor to_linkage_matrix(const std::vector<Merge>& merges, int64_t n) {
  std::vector<int64_t> order(merges.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t p, int64_t q) { return merges[p].height < merges[q].height; });
  at::Tensor z = at::empty({n - 1, 4}, at::TensorOptions().dtype(at::kDouble));
  double* out = z.data_ptr<double>();
  UnionFind uf(n);
  for (int64_t k = 0; k < n - 1; ++k) {
    const Merge& m = merges[order[k]];
    const int64_t rx = uf.find(m.a), ry = uf.find(m.b);
    out[4 * k + 0] = static_cast<double>(std::min(rx, ry));
    out[4 * k + 1] = static_cast<double>(std::max(rx, ry));
    out[4 * k + 2] = m.height;
    out[4 * k + 3] = static_cast<double>(uf.merge(rx, ry));
  }
  return z;
}

at::Tensor linkage_cpu(const at::Tensor& d_in, c10::string_view method_name) {
  NvtxRange range("fedtreelora::linkage");
  TORCH_CHECK_VALUE(d_in.dim() == 2 && d_in.size(0) == d_in.size(1),
                    "linkage: d must be a square [N, N] distance matrix, got shape ", d_in.sizes());
  TORCH_CHECK_TYPE(d_in.scalar_type() == at::kDouble, "linkage: d must be float64, got ", d_in.scalar_type());
  TORCH_CHECK_VALUE(d_in.device().is_cpu(), "linkage: the CPU kernel got d on ", d_in.device());
  LinkageMethod method;
  TORCH_CHECK_VALUE(parse_linkage_method(std::string(method_name), &method),
                    "linkage: method must be one of single, complete, average, weighted, ward; got '",
                    std::string(method_name), "'");
  const int64_t n = d_in.size(0);
  TORCH_CHECK_VALUE(n >= 1, "linkage: d has no points (shape ", d_in.sizes(), ")");
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int>::max() / 2, "linkage: too many points (", n, ")");
  const at::Tensor d = d_in.contiguous();
  std::vector<Merge> merges;
  if (method == LinkageMethod::Single) {
    check_distance_matrix(d.data_ptr<double>(), n, nullptr);
    if (n == 1) return at::empty({0, 4}, d.options());
    merges = mst_single_linkage(d.data_ptr<double>(), n);  // reads d only
  } else {
    Square w(n);  // nn_chain overwrites this copy; the caller's d stays as it is
    check_distance_matrix(d.data_ptr<double>(), n, &w);
    if (n == 1) return at::empty({0, 4}, d.options());
    switch (method) {
      case LinkageMethod::Complete: merges = nn_chain<LinkageMethod::Complete>(w.data, n); break;
      case LinkageMethod::Average: merges = nn_chain<LinkageMethod::Average>(w.data, n); break;
      case LinkageMethod::Weighted: merges = nn_chain<LinkageMethod::Weighted>(w.data, n); break;
      default: merges = nn_chain<LinkageMethod::Ward>(w.data, n); break;
    }
  }
  for (int64_t k = 0; k < n - 1; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(merges[k].height),
                      "linkage: a merge height overflowed or is NaN (", merges[k].height,
                      "); distances too large for method '", std::string(method_name), "'");
  }
  return to_linkage_matrix(merges, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) {
  m.impl("linkage", &linkage_cpu);
}

}  // namespace fedtreelora
