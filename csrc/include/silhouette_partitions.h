// silhouette's host-side preparation of the partitions, shared by the CPU kernel and the CUDA entry
// point (which uploads the result): labels renumbered per partition (refusing bad ones with the same
// message on both backends) and the common refinement of each layer's partitions, whose classes'
// distance sums give every partition's cluster sums. Deterministic (counting sorts, or a table of
// the (class, label) pairs when they are few), layer by layer.
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

inline Partitions empty_partitions(int64_t parts, int64_t n) {
  return Partitions{std::vector<int32_t>(parts * n), std::vector<int64_t>(parts * (n + 1), 0), std::vector<int64_t>(parts)};
}

// Renumbers the M partitions of layer l (raw: the labels [L, M, N]) into p, sized by
// empty_partitions; slot is scratch of N entries. Returns -1, or the index into raw of the layer's
// first label outside [0, N) (its partitions are then incomplete: report it with label_error).
inline int64_t compact_layer(const int64_t* raw, int64_t l, int64_t n_parts, int64_t n, Partitions& p,
                             std::vector<int32_t>& slot) {
  slot.resize(n);
  for (int64_t q = l * n_parts; q < (l + 1) * n_parts; ++q) {
    std::fill(slot.begin(), slot.end(), -1);
    int32_t k = 0;
    int32_t* label = p.label.data() + q * n;
    int64_t* start = p.start.data() + q * (n + 1);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = raw[q * n + j];
      if (v < 0 || v >= n) return q * n + j;
      if (slot[v] < 0) slot[v] = k++;
      label[j] = slot[v];
      ++start[label[j] + 1];
    }
    for (int32_t c = 0; c < k; ++c) start[c + 1] += start[c];
    p.n_labels[q] = k;
  }
  return -1;
}

// The ValueError for raw[at] (labels [L, M, N]), the first label outside [0, N).
[[noreturn]] inline void label_error(const int64_t* raw, int64_t at, int64_t n_parts, int64_t n) {
  const int64_t q = at / n;
  TORCH_CHECK_VALUE(false, "silhouette: labels must lie in [0, N) with N=", n, ", found ", raw[at], " at [",
                    q / n_parts, ", ", q % n_parts, ", ", at % n, "]");
  __builtin_unreachable();
}

inline Partitions compact_partitions(const at::Tensor& labels, int64_t n) {
  const int64_t n_layers = labels.size(0), n_parts = labels.size(1);
  const int64_t* raw = labels.data_ptr<int64_t>();
  Partitions p = empty_partitions(n_layers * n_parts, n);
  std::vector<int32_t> slot(n);
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t bad = compact_layer(raw, l, n_parts, n, p, slot);
    if (bad >= 0) label_error(raw, bad, n_parts, n);
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

inline Refinement empty_refinement(int64_t n_layers, int64_t n_parts, int64_t n) {
  return Refinement{std::vector<int32_t>(n_layers * n), std::vector<int64_t>(n_layers * (n + 1), 0),
                    std::vector<int64_t>(n_layers, n > 0 ? 1 : 0), std::vector<int32_t>(n_layers * n_parts * n, 0),
                    std::vector<int32_t>(n_layers * n)};
}

// Scratch of refine_layer, reused across layers.
struct RefineScratch {
  std::vector<int32_t> cls, renumber, order, mark, id, table;
  std::vector<int64_t> at;
};

// The refinement of layer l's partitions (p from compact_layer) into f, sized by empty_refinement.
inline void refine_layer(const Partitions& p, int64_t l, int64_t n_parts, int64_t n, Refinement& f, RefineScratch& s) {
  std::vector<int32_t>&cls = s.cls, &renumber = s.renumber, &order = s.order, &mark = s.mark, &id = s.id;
  cls.assign(n, 0);
  renumber.resize(n);
  order.resize(n);
  int64_t count = n > 0 ? 1 : 0;
  for (int64_t m = 0; m < n_parts; ++m) {  // split every class by the labels of partition m
    const int32_t* lab = p.label.data() + (l * n_parts + m) * n;
    const int64_t k = p.n_labels[l * n_parts + m];
    int32_t next = 0;
    if (count * k <= 4 * n + 64) {  // few (class, label) pairs: a table of them, numbered as they appear
      s.table.assign(count * k, -1);
      for (int64_t j = 0; j < n; ++j) {
        int32_t& slot = s.table[cls[j] * k + lab[j]];
        if (slot < 0) slot = next++;
        renumber[j] = slot;
      }
    } else {
      s.at.assign(count + 1, 0);  // clients ordered by class (counting sort) ...
      for (int64_t j = 0; j < n; ++j) ++s.at[cls[j] + 1];
      for (int64_t r = 0; r < count; ++r) s.at[r + 1] += s.at[r];
      for (int64_t j = 0; j < n; ++j) order[s.at[cls[j]]++] = static_cast<int32_t>(j);
      mark.assign(k, -1);  // ... so a label is new to a class when its mark is not that class:
      id.resize(k);        // O(N + k) memory, not O(N k)
      for (int64_t t = 0; t < n; ++t) {
        const int32_t j = order[t], c = cls[j], v = lab[j];
        if (mark[v] != c) mark[v] = c, id[v] = next++;
        renumber[j] = id[v];
      }
    }
    cls.swap(renumber);
    count = next;
  }
  int64_t* start = f.start.data() + l * (n + 1);
  for (int64_t j = 0; j < n; ++j) ++start[cls[j] + 1];
  for (int64_t r = 0; r < count; ++r) start[r + 1] += start[r];
  s.at.assign(start, start + count);
  for (int64_t j = 0; j < n; ++j) f.members[l * n + s.at[cls[j]]++] = static_cast<int32_t>(j);
  for (int64_t m = 0; m < n_parts; ++m) {
    const int32_t* lab = p.label.data() + (l * n_parts + m) * n;
    for (int64_t j = 0; j < n; ++j) f.cluster[(l * n_parts + m) * n + cls[j]] = lab[j];
  }
  std::copy(cls.begin(), cls.end(), f.class_of.begin() + l * n);
  f.n_classes[l] = count;
}

inline Refinement refine_partitions(const Partitions& p, int64_t n_layers, int64_t n_parts, int64_t n) {
  Refinement f = empty_refinement(n_layers, n_parts, n);
  RefineScratch scratch;
  for (int64_t l = 0; l < n_layers; ++l) refine_layer(p, l, n_parts, n, f, scratch);
  return f;
}

}  // namespace fedtreelora
