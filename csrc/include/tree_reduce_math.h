// The per-cluster arithmetic of tree_reduce, shared by the CPU and CUDA kernels: cluster sums
// become a cluster mean and an external mean (everyone else), with the empty cases set to 0.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fedtreelora {

// Mean of a cluster from its weighted sum; 0 when the label is absent from the layer.
template <typename acc_t>
FEDTREELORA_HD inline acc_t cluster_mean(acc_t cluster_sum, acc_t cluster_weight, int64_t cluster_count) {
  return cluster_count > 0 ? cluster_sum / cluster_weight : acc_t(0);
}

// Mean over everyone outside the cluster, from the column total minus the cluster's sum; 0 when
// the cluster is absent or holds every client (no "everyone else" to average).
template <typename acc_t>
FEDTREELORA_HD inline acc_t external_mean(acc_t total_sum, acc_t cluster_sum, acc_t total_weight,
                                          acc_t cluster_weight, int64_t cluster_count, int64_t n_clients) {
  if (cluster_count == 0 || cluster_count == n_clients) return acc_t(0);
  return (total_sum - cluster_sum) / (total_weight - cluster_weight);
}

}  // namespace fedtreelora
