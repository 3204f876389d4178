// linkage on CPU: agglomerative clustering of a square distance matrix into scipy's Z.
//
// The algorithms are scipy's (scipy/cluster/_hierarchy.pyx), step for step, so that Z is equal to
// scipy.cluster.hierarchy.linkage(squareform(d), method) to the bit: the minimum spanning tree
// (Prim) for single linkage, the nearest-neighbour chain for the others, on the condensed upper
// triangle; then a stable sort of the merges by height and a relabelling with union-find. Where
// scipy scans every index and skips dead clusters, we walk a sorted list of the live ones: same
// visiting order (so the same tie-breaking), less work.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "linkage_update.h"
#include "nvtx_range.h"

namespace fedtreelora {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The strict upper triangle of d, row by row: (i, j) with i < j lives at offset(i) + j.
struct Condensed {
  int64_t n;
  std::vector<int64_t> row;  // row[i] = start of row i minus (i + 1)
  std::vector<double> data;

  double& at(int64_t i, int64_t j) { return i < j ? data[row[i] + j] : data[row[j] + i]; }
};

// Copies the upper triangle and checks, on the way, what the kernel relies on: finite,
// non-negative and exactly symmetric (the Python wrapper checks the same with clearer context).
Condensed condense_and_check(const at::Tensor& d) {
  const int64_t n = d.size(0);
  const double* src = d.data_ptr<double>();
  Condensed c{n, std::vector<int64_t>(n), std::vector<double>(n * (n - 1) / 2)};
  for (int64_t i = 0; i < n; ++i) c.row[i] = i * n - i * (i + 1) / 2 - (i + 1);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(src[i * n + i] == 0.0, "linkage: d must have a zero diagonal, d[", i, ", ", i, "] = ", src[i * n + i]);
  }
  // Blocks of rows, so that reading the transposed half stays in cache.
  constexpr int64_t kBlock = 64;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
      for (int64_t j0 = i0; j0 < n; j0 += kBlock) {
        const int64_t j1 = std::min(n, j0 + kBlock);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
            const double v = src[i * n + j];
            c.data[c.row[i] + j] = v;
            // !(v >= 0) also catches NaN; v == +inf is caught by the isfinite test.
            if (!(v >= 0.0) || !std::isfinite(v) || v != src[j * n + i]) {
              int64_t seen = first_bad.load();
              while (i * n + j < seen && !first_bad.compare_exchange_weak(seen, i * n + j)) {
              }
            }
          }
        }
      }
    }
  });
  if (const int64_t flat = first_bad.load(); flat != std::numeric_limits<int64_t>::max()) {
    const int64_t i = flat / n, j = flat % n;
    const double v = src[i * n + j], w = src[j * n + i];
    TORCH_CHECK_VALUE(std::isfinite(v) && std::isfinite(w), "linkage: d has a NaN or Inf entry at [", i, ", ", j, "]");
    TORCH_CHECK_VALUE(v >= 0.0, "linkage: d has a negative distance at [", i, ", ", j, "]: ", v);
    TORCH_CHECK_VALUE(false, "linkage: d must be exactly symmetric, d[", i, ", ", j, "] = ", v, " != d[", j, ", ", i, "] = ", w);
  }
  return c;
}

// One merge as the algorithms find it: two leaves standing for the merged clusters, and the height.
struct Merge {
  int64_t a, b;
  double height;
};

// The live clusters in increasing index order, with O(1) removal (scipy visits them in that order).
struct LiveList {
  std::vector<int64_t> next, prev;
  int64_t first;
  int64_t end;

  explicit LiveList(int64_t n) : next(n), prev(n), first(0), end(n) {
    for (int64_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i - 1;
    }
  }
  void remove(int64_t i) {
    if (prev[i] >= 0) next[prev[i]] = next[i]; else first = next[i];
    if (next[i] < end) prev[next[i]] = prev[i];
  }
};

// scipy's mst_single_linkage: Prim's algorithm from node 0; row k joins the last node added (x)
// with the nearest node outside the tree (y). The relabelling step turns this into the dendrogram.
std::vector<Merge> mst_single_linkage(const Condensed& c) {
  const int64_t n = c.n;
  std::vector<Merge> merges(n - 1);
  std::vector<double> nearest(n, kInf);  // distance of each outside node to the tree
  LiveList outside(n);
  int64_t x = 0, y = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    outside.remove(x);
    double current_min = kInf;
    for (int64_t i = outside.first; i < n; i = outside.next[i]) {
      const double dist = x < i ? c.data[c.row[x] + i] : c.data[c.row[i] + x];
      if (nearest[i] > dist) nearest[i] = dist;
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

// scipy's nn_chain. Cluster i (a live index) is the union of the leaves merged into i; merging x < y
// keeps y. The chain prefers its previous element on ties so that it cannot cycle.
template <LinkageMethod M>
std::vector<Merge> nn_chain(Condensed& c) {
  const int64_t n = c.n;
  double* D = c.data.data();
  const int64_t* row = c.row.data();
  std::vector<Merge> merges(n - 1);
  std::vector<int> size(n, 1);
  LiveList live(n);
  std::vector<int64_t> chain;
  chain.reserve(n);

  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain.empty()) chain.push_back(live.first);
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
      int64_t i = live.first;
      for (; i < x; i = live.next[i]) {
        const double dist = D[row[i] + x];
        if (dist < current_min) {
          current_min = dist;
          y = i;
        }
      }
      const double* rx = D + row[x];
      for (i = live.next[x]; i < n; i = live.next[i]) {
        const double dist = rx[i];
        if (dist < current_min) {
          current_min = dist;
          y = i;
        }
      }
      // Only reachable when every distance from x is NaN (ward on a far from euclidean d).
      TORCH_CHECK_VALUE(y >= 0, "linkage: method produced NaN distances (cluster of point ", x,
                        "); ward linkage needs euclidean-like distances");
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

    // d(i, x u y) for every live i != y, stored at (i, y). x < y, so three ranges of i.
    int64_t i = live.first;
    for (; i < x; i = live.next[i]) {
      D[row[i] + y] = linkage_update<M>(D[row[i] + x], D[row[i] + y], current_min, nx, ny, size[i]);
    }
    double* rx = D + row[x];
    for (; i < y; i = live.next[i]) {
      D[row[i] + y] = linkage_update<M>(rx[i], D[row[i] + y], current_min, nx, ny, size[i]);
    }
    double* ry = D + row[y];
    for (i = live.next[y]; i < n; i = live.next[i]) {
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
  Condensed c = condense_and_check(d);
  if (n == 1) return at::empty({0, 4}, d.options());

  std::vector<Merge> merges;
  switch (method) {
    case LinkageMethod::Single: merges = mst_single_linkage(c); break;
    case LinkageMethod::Complete: merges = nn_chain<LinkageMethod::Complete>(c); break;
    case LinkageMethod::Average: merges = nn_chain<LinkageMethod::Average>(c); break;
    case LinkageMethod::Weighted: merges = nn_chain<LinkageMethod::Weighted>(c); break;
    case LinkageMethod::Ward: merges = nn_chain<LinkageMethod::Ward>(c); break;
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
