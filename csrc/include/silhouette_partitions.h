// silhouette's host-side preparation of the partitions, shared by the CPU kernel and the CUDA entry
// point (which uploads the result): labels renumbered per partition (refusing bad ones with the same
// message on both backends) and the common refinement of each layer's partitions, whose classes'
// distance sums give every partition's cluster sums. Deterministic (counting sorts).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fedtreelora {

// Labels renumbered 0..k-1 per partition (they may be any values in [0, N)), and the cluster sizes as
// prefix sums: cluster c holds start[c + 1] - start[c] clients.
struct Partitions {
  std::vector<int32_t> label;     // [L, M, N] compact labels
  std::vector<int64_t> start;     // [L, M, N + 1] (first n_labels + 1 entries used)
  std::vector<int64_t> n_labels;  // [L, M]
};

inline Partitions compact_partitions(const at::Tensor& labels, int64_t n) {
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
  std::vector<int32_t> class_of;   // [L, N] the class of each client
};

inline Refinement refine_partitions(const Partitions& p, int64_t n_layers, int64_t n_parts, int64_t n) {
  Refinement f{std::vector<int32_t>(n_layers * n), std::vector<int64_t>(n_layers * (n + 1), 0),
               std::vector<int64_t>(n_layers, n > 0 ? 1 : 0), std::vector<int32_t>(n_layers * n_parts * n, 0),
               std::vector<int32_t>(n_layers * n)};
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
    std::copy(cls.begin(), cls.end(), f.class_of.begin() + l * n);
    f.n_classes[l] = count;
  }
  return f;
}

}  // namespace fedtreelora
