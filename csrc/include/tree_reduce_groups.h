// tree_reduce's grouping of the clients by cluster, on the host, shared by the CPU kernel and the
// CUDA entry point (which uploads the result): deterministic (a stable counting sort, weights summed
// in client order), and it validates labels and weights with the same messages on both backends.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fedtreelora {

// Per layer: the clients grouped by cluster (a stable counting sort), cluster c's members being
// members[start[c] : start[c + 1]], and each cluster's summed weight.
struct LayerClusters {
  std::vector<int32_t> members;  // [L, N]
  std::vector<int64_t> start;    // [L, C + 1]
  std::vector<double> weight;    // [L, C]
  std::vector<double> total;     // [L]
};

inline LayerClusters group_clients(const int64_t* labels, const double* weights, int64_t n_layers, int64_t n,
                            int64_t n_clusters) {
  LayerClusters lc{std::vector<int32_t>(n_layers * n), std::vector<int64_t>(n_layers * (n_clusters + 1), 0),
                   std::vector<double>(n_layers * n_clusters, 0.0), std::vector<double>(n_layers, 0.0)};
  for (int64_t k = 0; k < n; ++k)
    TORCH_CHECK_VALUE(std::isfinite(weights[k]) && weights[k] > 0, "tree_reduce: weights must be finite and > 0, client ",
                      k, " has weight ", weights[k]);
  std::vector<int64_t> next(n_clusters);
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* lab = labels + l * n;
    int64_t* start = lc.start.data() + l * (n_clusters + 1);
    for (int64_t k = 0; k < n; ++k) {
      TORCH_CHECK_VALUE(lab[k] >= 0 && lab[k] < n_clusters, "tree_reduce: labels must lie in [0, n_clusters=",
                        n_clusters, "), client ", k, " has label ", lab[k], " in layer ", l);
      ++start[lab[k] + 1];
      lc.weight[l * n_clusters + lab[k]] += weights[k];
      lc.total[l] += weights[k];
    }
    for (int64_t c = 0; c < n_clusters; ++c) start[c + 1] += start[c];
    std::copy(start, start + n_clusters, next.begin());
    for (int64_t k = 0; k < n; ++k) lc.members[l * n + next[lab[k]]++] = static_cast<int32_t>(k);
  }
  return lc;
}

}  // namespace fedtreelora
