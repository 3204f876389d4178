// linkage on CPU: agglomerative clustering of a square distance matrix into scipy's Z.
//
// The algorithms are scipy's (scipy/cluster/_hierarchy.pyx), step for step, so that Z is equal to
// scipy.cluster.hierarchy.linkage(squareform(d), method) to the bit: the minimum spanning tree
// (Prim) for single linkage, the nearest-neighbour chain for the others, then a stable sort of the
// merges by height and a relabelling with union-find. nn_chain works on the condensed upper triangle
// like scipy (a full square copy kept symmetric was slower: its column writes miss the cache);
// Prim reads d's rows directly. Where scipy scans every index and skips dead clusters, we walk a
// sorted list of the live ones: same visiting order, so the same tie-breaking, and less work.
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

#include "linkage_update.h"
#include "nvtx_range.h"

namespace fedtreelora {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The strict upper triangle of d, row after row (scipy's condensed form): (i, j), i < j, lives at
// row[i] + j. nn_chain reads its columns, one row apart per element: on Linux the buffer asks for
// transparent huge pages, so that those reads do not also miss the TLB.
struct Condensed {
  std::vector<int64_t> row;  // start of row i minus (i + 1)
  std::unique_ptr<double, void (*)(void*)> buffer{nullptr, std::free};
  double* data = nullptr;

  explicit Condensed(int64_t n) : row(n) {
    for (int64_t i = 0; i < n; ++i) row[i] = i * n - i * (i + 1) / 2 - (i + 1);
    constexpr size_t kHugePage = size_t{2} << 20;
    size_t bytes = std::max<size_t>(sizeof(double) * static_cast<size_t>(n * (n - 1) / 2), sizeof(double));
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
// Python wrapper checks the same with more context; this keeps direct op calls safe), and fills
// `condensed` on the way when given. Square tiles, so that the transposed half stays in cache.
void check_distance_matrix(const double* d, int64_t n, Condensed* condensed) {
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
        if (condensed != nullptr && j_begin < j1) {
          std::copy(d + i * n + j_begin, d + i * n + j1, condensed->data + condensed->row[i] + j_begin);
        }
        if (!ok) {
          int64_t seen = first_bad.load();
          while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
          }
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

// The column part of a condensed scan jumps a whole row per element: prefetch a few ahead.
constexpr size_t kPrefetchAhead = 32;
inline void prefetch(const double* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// scipy's nn_chain on the condensed matrix, which it overwrites: (i, y) becomes the distance of
// cluster i to the union of x and y. The chain prefers its previous element on ties so that it
// cannot cycle.
template <LinkageMethod M>
std::vector<Merge> nn_chain(Condensed& c, int64_t n) {
  double* D = c.data;
  const int64_t* row = c.row.data();
  std::vector<Merge> merges(n - 1);
  std::vector<int> size(n, 1);
  LiveList live(n);
  std::vector<int64_t> chain;
  chain.reserve(n);

  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain.empty()) chain.push_back(live.ids.front());
    int64_t x, y;
    double current_min;
    while (true) {
      x = chain.back();
      if (chain.size() > 1) {
        y = chain[chain.size() - 2];
        current_min = x < y ? D[row[x] + y] : D[row[y] + x];
      } else {
        y = -1;
        current_min = kInf;
      }
      const int64_t* ids = live.ids.data();
      const size_t count = live.ids.size();
      const size_t px = std::lower_bound(ids, ids + count, x) - ids;  // ids[px] == x
      for (size_t p = 0; p < px; ++p) {  // i < x: column x of the rows above
        if (p + kPrefetchAhead < px) prefetch(D + row[ids[p + kPrefetchAhead]] + x);
        const double dist = D[row[ids[p]] + x];
        if (dist < current_min) {
          current_min = dist;
          y = ids[p];
        }
      }
      const double* rx = D + row[x];
      for (size_t p = px + 1; p < count; ++p) {  // i > x: row x
        const double dist = rx[ids[p]];
        if (dist < current_min) {
          current_min = dist;
          y = ids[p];
        }
      }
      // Only reachable when every distance from x is NaN: ward squares distances, and above ~1e154
      // the squares overflow (inf - inf). Mutual nearest neighbours keep ward's sqrt argument >= 0.
      TORCH_CHECK_VALUE(y >= 0, "linkage: the distances overflowed to NaN in the Lance-Williams updates (cluster of point ",
                        x, "); scale d down");
      if (chain.size() > 1 && y == chain[chain.size() - 2]) break;
      chain.push_back(y);
    }
    chain.resize(chain.size() - 2);
    if (x > y) std::swap(x, y);  // fastcluster's convention, kept by scipy
    const int nx = size[x], ny = size[y];
    merges[k] = {x, y, current_min};
    size[x] = 0;
    size[y] = nx + ny;
    live.remove(x);

    // d(i, x u y) for every live i != y, stored at (i, y); x < y, so three ranges of i.
    const int64_t* ids = live.ids.data();
    const size_t count = live.ids.size();
    const size_t px = std::lower_bound(ids, ids + count, x) - ids;  // first live index above x
    const size_t py = std::lower_bound(ids, ids + count, y) - ids;  // ids[py] == y
    for (size_t p = 0; p < px; ++p) {
      if (p + kPrefetchAhead < px) {
        prefetch(D + row[ids[p + kPrefetchAhead]] + x);
        prefetch(D + row[ids[p + kPrefetchAhead]] + y);
      }
      double* ri = D + row[ids[p]];
      ri[y] = linkage_update<M>(ri[x], ri[y], current_min, nx, ny, size[ids[p]]);
    }
    const double* rx = D + row[x];
    for (size_t p = px; p < py; ++p) {
      if (p + kPrefetchAhead < py) prefetch(D + row[ids[p + kPrefetchAhead]] + y);
      const int64_t i = ids[p];
      D[row[i] + y] = linkage_update<M>(rx[i], D[row[i] + y], current_min, nx, ny, size[i]);
    }
    double* ry = D + row[y];
    for (size_t p = py + 1; p < count; ++p) {
      const int64_t i = ids[p];
      ry[i] = linkage_update<M>(rx[i], ry[i], current_min, nx, ny, size[i]);
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
    Condensed c(n);  // nn_chain overwrites this copy; the caller's d stays as it is
    check_distance_matrix(d.data_ptr<double>(), n, &c);
    if (n == 1) return at::empty({0, 4}, d.options());
    switch (method) {
      case LinkageMethod::Complete: merges = nn_chain<LinkageMethod::Complete>(c, n); break;
      case LinkageMethod::Average: merges = nn_chain<LinkageMethod::Average>(c, n); break;
      case LinkageMethod::Weighted: merges = nn_chain<LinkageMethod::Weighted>(c, n); break;
      default: merges = nn_chain<LinkageMethod::Ward>(c, n); break;
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
