// cut_tree on CPU: the partitions of a linkage tree into exactly c clusters, with scipy's labels.
//
// scipy.cluster.hierarchy.cut_tree applies the merges in the order of _order_cluster_tree (heights
// ascending; equal heights in reverse breadth-first order, right child queued before left, which
// is what bisect.insort_left over that traversal gives) and, at each merge, gives every leaf of the
// merged node the smallest label found among them and shifts the labels above the largest one down
// by one. We do the same steps on plain arrays: O(N) per merge, O(N^2) at worst, and we stop at the
// last partition asked for.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <numeric>
#include <vector>

#include "nvtx_range.h"

namespace fedtreelora {
namespace {

// Tree of z: node id < n is a leaf, n + k is the node formed by row k.
struct LinkageTree {
  int64_t n;
  std::vector<int64_t> left, right;  // children of node n + k
  std::vector<double> height;
  std::vector<int64_t> count;        // leaves under each node (all 2n - 1 ids)
};

// Reads z and checks what scipy's is_valid_linkage and to_tree check, so a malformed z raises.
LinkageTree read_tree(const at::Tensor& z) {
  const int64_t rows = z.size(0), n = rows + 1;
  const double* p = z.data_ptr<double>();
  LinkageTree t{n, std::vector<int64_t>(rows), std::vector<int64_t>(rows), std::vector<double>(rows),
                std::vector<int64_t>(2 * n - 1, 1)};
  std::vector<char> used(2 * n - 1, 0);
  for (int64_t k = 0; k < rows; ++k) {
    const double* r = p + 4 * k;
    for (int side = 0; side < 2; ++side) {
      const double id = r[side];
      TORCH_CHECK_VALUE(std::isfinite(id) && id == std::floor(id) && id >= 0 && id < n + k,
                        "cut_tree: z row ", k, " column ", side, " holds ", id,
                        ", not the id of a leaf or of a cluster formed in an earlier row (ids must be integers in [0, ",
                        n + k, "))");
      const auto node = static_cast<int64_t>(id);
      TORCH_CHECK_VALUE(!used[node], "cut_tree: z uses cluster ", node, " more than once (again in row ", k, ")");
      used[node] = 1;
    }
    t.left[k] = static_cast<int64_t>(r[0]);
    t.right[k] = static_cast<int64_t>(r[1]);
    t.height[k] = r[2];
    TORCH_CHECK_VALUE(std::isfinite(r[2]) && r[2] >= 0, "cut_tree: z row ", k, " has height ", r[2],
                      "; heights must be finite and non-negative");
    t.count[n + k] = t.count[t.left[k]] + t.count[t.right[k]];
    TORCH_CHECK_VALUE(r[3] == static_cast<double>(t.count[n + k]), "cut_tree: z row ", k, " has count ", r[3],
                      " but its clusters hold ", t.count[n + k], " points");
  }
  return t;
}

// The rows of z in scipy's merge order (_order_cluster_tree).
std::vector<int64_t> merge_order(const LinkageTree& t) {
  const int64_t n = t.n, rows = n - 1;
  std::vector<int64_t> visit(rows);  // breadth-first position of each row
  std::deque<int64_t> queue{2 * n - 2};
  int64_t position = 0;
  while (!queue.empty()) {
    const int64_t node = queue.front();
    queue.pop_front();
    if (node < n) continue;
    visit[node - n] = position++;
    queue.push_back(t.right[node - n]);
    queue.push_back(t.left[node - n]);
  }
  std::vector<int64_t> order(rows);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (t.height[a] != t.height[b]) return t.height[a] < t.height[b];
    return visit[a] > visit[b];
  });
  return order;
}

at::Tensor cut_tree_cpu(const at::Tensor& z_in, const at::Tensor& n_clusters_in) {
  NvtxRange range("fedtreelora::cut_tree");
  TORCH_CHECK_VALUE(z_in.dim() == 2 && z_in.size(1) == 4, "cut_tree: z must be a linkage matrix [N-1, 4], got shape ",
                    z_in.sizes());
  TORCH_CHECK_TYPE(z_in.scalar_type() == at::kDouble, "cut_tree: z must be float64, got ", z_in.scalar_type());
  TORCH_CHECK_VALUE(n_clusters_in.dim() == 1, "cut_tree: n_clusters must be 1-D [M], got shape ", n_clusters_in.sizes());
  TORCH_CHECK_TYPE(n_clusters_in.scalar_type() == at::kLong, "cut_tree: n_clusters must be int64, got ",
                   n_clusters_in.scalar_type());
  TORCH_CHECK_VALUE(z_in.device().is_cpu() && n_clusters_in.device().is_cpu(),
                    "cut_tree: the CPU kernel got z on ", z_in.device(), " and n_clusters on ", n_clusters_in.device());
  const at::Tensor z = z_in.contiguous();
  const at::Tensor n_clusters = n_clusters_in.contiguous();
  const int64_t n = z.size(0) + 1, m = n_clusters.size(0);
  const int64_t* want = n_clusters.data_ptr<int64_t>();

  // Partition after `step` merges has n - step clusters; group the requests by step.
  std::vector<std::vector<int64_t>> requests(n);
  int64_t last_step = 0;
  for (int64_t r = 0; r < m; ++r) {
    TORCH_CHECK_VALUE(want[r] >= 1 && want[r] <= n, "cut_tree: n_clusters must lie in [1, ", n, "] for a tree over ", n,
                      " points, got ", want[r], " at position ", r);
    requests[n - want[r]].push_back(r);
    last_step = std::max(last_step, n - want[r]);
  }
  const LinkageTree tree = read_tree(z);

  at::Tensor out = at::empty({m, n}, n_clusters.options());
  int64_t* labels_out = out.data_ptr<int64_t>();
  std::vector<int64_t> label(n);
  std::iota(label.begin(), label.end(), 0);
  auto emit = [&](int64_t step) {
    for (int64_t r : requests[step]) std::copy(label.begin(), label.end(), labels_out + r * n);
  };
  emit(0);
  if (last_step == 0) return out;

  // Leaves in pre-order: the leaves under node v are leaves[first[v] .. first[v] + count[v]).
  std::vector<int64_t> first(2 * n - 1, 0), leaves(n);
  for (int64_t v = 2 * n - 2; v >= 0; --v) {  // parents (larger ids) before their children
    if (v < n) {
      leaves[first[v]] = v;
    } else {
      const int64_t l = tree.left[v - n], r = tree.right[v - n];
      first[l] = first[v];
      first[r] = first[v] + tree.count[l];
    }
  }

  const std::vector<int64_t> order = merge_order(tree);
  for (int64_t step = 1; step <= last_step; ++step) {
    const int64_t v = n + order[step - 1];
    const int64_t* under = leaves.data() + first[v];
    int64_t lo = label[under[0]], hi = lo;
    for (int64_t i = 1; i < tree.count[v]; ++i) {
      lo = std::min(lo, label[under[i]]);
      hi = std::max(hi, label[under[i]]);
    }
    for (int64_t i = 0; i < tree.count[v]; ++i) label[under[i]] = lo;
    for (int64_t k = 0; k < n; ++k) label[k] -= label[k] > hi;
    emit(step);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) {
  m.impl("cut_tree", &cut_tree_cpu);
}

}  // namespace fedtreelora
