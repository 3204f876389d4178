// Silhouette of one client from its summed distances to every cluster, and the input contract on d;
// shared by the CPU and CUDA kernels so that both follow sklearn's definition
// (metrics.silhouette_samples) to the letter and refuse the same distance matrices.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fedtreelora {

// a = mean distance to the other members of the own cluster (own_sum / (own_size - 1)),
// b = smallest mean distance to another cluster; s = (b - a) / max(a, b).
// A singleton scores 0, and so does a == b == 0 (sklearn's nan_to_num of 0/0).
FEDTREELORA_HD inline double silhouette_from_means(double a, double b, int64_t own_size) {
  if (own_size <= 1) return 0.0;
  const double denom = a > b ? a : b;
  return denom > 0.0 ? (b - a) / denom : 0.0;
}

// The partition is scored only when 2 <= distinct labels <= N - 1 (sklearn raises otherwise).
FEDTREELORA_HD inline bool silhouette_defined(int64_t n_labels, int64_t n) {
  return n_labels >= 2 && n_labels <= n - 1;
}

// The contract on d, checked in the kernels' one pass over it, is sklearn's and nothing more:
// - finite and >= 0 (sklearn's check_array and "Negative values in data passed to precomputed
//   distance matrix");
// - a diagonal within 100 machine epsilons of the input dtype of 0 (sklearn's silhouette_samples:
//   atol = np.finfo(X.dtype).eps * 100; an integer d is converted exactly, so its diagonal must be 0).
// Like sklearn, the kernels read d by rows (client i's distances are d[i, :]) and do not require
// symmetry: checking it would cost a transposed second read of d.

}  // namespace fedtreelora
