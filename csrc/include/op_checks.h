// Shape, dtype and layer-offset checks that the CPU and CUDA entry points of an op share, so that
// both refuse the same inputs with the same messages (device checks stay with each backend).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fedtreelora {

// d [L, N, N] floating point, labels int64 [L, M, N].
inline void check_silhouette_args(const at::Tensor& d, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(d.dim() == 3 && d.size(1) == d.size(2), "silhouette: d must be [L, N, N], got ", d.sizes());
  TORCH_CHECK_TYPE(d.is_floating_point(), "silhouette: d must be floating point, got ", d.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "silhouette: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 3 && labels.size(0) == d.size(0) && labels.size(2) == d.size(1),
                    "silhouette: labels must be [L, M, N] = [", d.size(0), ", M, ", d.size(1), "], got ", labels.sizes());
}

// x [N, P] floating point, layer_offsets int64 [L + 1], labels int64 [L, N], weights float64 [N],
// n_clusters >= 1: the shapes and dtypes, no values read (the CUDA entry point copies the offsets to
// the host together with the labels and weights, with one stream sync).
inline void check_tree_reduce_shapes(const at::Tensor& x, const at::Tensor& layer_offsets, const at::Tensor& labels,
                                     const at::Tensor& weights, int64_t n_clusters) {
  TORCH_CHECK_VALUE(x.dim() == 2, "tree_reduce: x must be [N, P], got ", x.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point(), "tree_reduce: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_TYPE(layer_offsets.scalar_type() == at::kLong, "tree_reduce: layer_offsets must be int64");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "tree_reduce: labels must be int64");
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kDouble, "tree_reduce: weights must be float64");
  TORCH_CHECK_VALUE(n_clusters >= 1, "tree_reduce: n_clusters must be >= 1, got ", n_clusters);
  const int64_t n = x.size(0);
  TORCH_CHECK_VALUE(layer_offsets.dim() == 1 && layer_offsets.numel() >= 2,
                    "tree_reduce: layer_offsets must be [L + 1] with L >= 1, got ", layer_offsets.sizes());
  const int64_t n_layers = layer_offsets.numel() - 1;
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == n_layers && labels.size(1) == n,
                    "tree_reduce: labels must be [L, N] = [", n_layers, ", ", n, "], got ", labels.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == n, "tree_reduce: weights must be [N] = [", n, "], got ",
                    weights.sizes());
}

// The offsets' values (o on the host, L + 1 of them): from 0 to P, strictly increasing.
inline void check_tree_reduce_offsets(const int64_t* o, int64_t n_layers, int64_t p) {
  TORCH_CHECK_VALUE(o[0] == 0 && o[n_layers] == p, "tree_reduce: layer_offsets must run from 0 to P=", p, ", got ", o[0],
                    " to ", o[n_layers]);
  for (int64_t l = 0; l < n_layers; ++l)
    TORCH_CHECK_VALUE(o[l] < o[l + 1], "tree_reduce: layer_offsets must be strictly increasing, layer ", l, " spans [",
                      o[l], ", ", o[l + 1], ")");
}

// Both of the above; returns the offsets on the host.
inline std::vector<int64_t> check_tree_reduce_args(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                   const at::Tensor& labels, const at::Tensor& weights,
                                                   int64_t n_clusters) {
  check_tree_reduce_shapes(x, layer_offsets, labels, weights, n_clusters);
  const at::Tensor off = layer_offsets.to(at::kCPU).contiguous();  // L + 1 numbers: a copy at most
  const int64_t n_layers = layer_offsets.numel() - 1;
  check_tree_reduce_offsets(off.data_ptr<int64_t>(), n_layers, x.size(1));
  return std::vector<int64_t>(off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + n_layers + 1);
}

}  // namespace fedtreelora
