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

// pack_rows: out [N, W] with unit column stride and rows that do not overlap, parts key-major
// (parts[j * N + i]: key j of client i), each contiguous, of out's dtype and device, key j's width
// the same for every client, the widths summing to W, no part overlapping out's span. Returns the
// first column of every key (K + 1 entries, the last W). Reads no values: one pass over the parts'
// metadata, naming the part, key and client at fault. `backend`: the device type of the kernel
// calling (the dispatcher picks it when any tensor is on that device).
inline std::vector<int64_t> check_pack_rows_args(at::TensorList parts, const at::Tensor& out, at::DeviceType backend) {
  TORCH_CHECK_VALUE(out.dim() == 2, "pack_rows: out must be [N, W], got ", out.sizes());
  const int64_t n = out.size(0), w = out.size(1);
  TORCH_CHECK_VALUE(n >= 1, "pack_rows: out must have at least one row, got ", out.sizes());
  TORCH_CHECK_VALUE(w <= 1 || out.stride(1) == 1, "pack_rows: out's columns must be unit-stride, got strides ",
                    out.strides());
  TORCH_CHECK_VALUE(n == 1 || w == 0 || out.stride(0) >= w, "pack_rows: out's rows overlap (row stride ", out.stride(0),
                    " < W=", w, ")");
  const int64_t count = static_cast<int64_t>(parts.size());
  TORCH_CHECK_VALUE(count % n == 0, "pack_rows: got ", count, " parts, not a multiple of N=", n,
                    " (out's rows): parts[j * N + i] must be key j of client i");
  const int64_t n_keys = count / n;
  // out's span in bytes, first row's start to last row's end: a part inside it could be overwritten
  // before it is read.
  const auto* out_begin = static_cast<const char*>(out.const_data_ptr());
  const auto* out_end = w > 0 ? out_begin + ((n - 1) * out.stride(0) + w) * out.element_size() : out_begin;
  std::vector<int64_t> cols(n_keys + 1, 0);
  // Like torch's out= functions: no autograd through a write into out (its history would be lost).
  const bool grad_mode = at::GradMode::is_enabled();
  for (int64_t j = 0; j < n_keys; ++j) {
    const int64_t width = parts[j * n].numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t idx = j * n + i;
      const at::Tensor& p = parts[idx];
      TORCH_CHECK_TYPE(p.scalar_type() == out.scalar_type(), "pack_rows: parts[", idx, "] (key ", j, ", client ", i,
                       ") is ", p.scalar_type(), " but out is ", out.scalar_type());
      TORCH_CHECK_VALUE(p.device() == out.device(), "pack_rows: parts[", idx, "] (key ", j, ", client ", i, ") is on ",
                        p.device(), " but out is on ", out.device());
      TORCH_CHECK_VALUE(p.is_contiguous(), "pack_rows: parts[", idx, "] (key ", j, ", client ", i,
                        ") is not contiguous (strides ", p.strides(), ")");
      TORCH_CHECK_VALUE(!(grad_mode && p.requires_grad()), "pack_rows: parts[", idx, "] (key ", j, ", client ", i,
                        ") requires grad, and pack_rows does not support autograd: pass detached tensors or "
                        "call it under torch.no_grad()");
      TORCH_CHECK_VALUE(p.numel() == width, "pack_rows: parts[", idx, "] (key ", j, ", client ", i, ") has ", p.numel(),
                        " elements but key ", j, " has ", width, " (client 0's, parts[", j * n, "])");
      if (width > 0 && w > 0) {
        const auto* begin = static_cast<const char*>(p.const_data_ptr());
        TORCH_CHECK_VALUE(begin + width * p.element_size() <= out_begin || begin >= out_end, "pack_rows: parts[", idx,
                          "] (key ", j, ", client ", i, ") overlaps out");
      }
    }
    cols[j + 1] = cols[j] + width;
  }
  TORCH_CHECK_VALUE(cols[n_keys] == w, "pack_rows: the ", n_keys, " keys' widths sum to ", cols[n_keys],
                    " but out has W=", w, " columns");
  // After the parts' devices, so that a part on another device is what the message names.
  TORCH_CHECK_VALUE(out.device().type() == backend, "pack_rows: out must be on ", backend, " here, got ", out.device());
  return cols;
}

// pack_rows writes out, an argument it does not return: the autograd fallback's ADInplaceOrView
// kernel bumps the version only of returned aliases, so the kernel bumps it itself (as every in-place
// op does): a backward through an earlier value of out then raises "modified by an inplace operation"
// instead of giving a wrong gradient, and an inference tensor outside inference mode is refused.
inline void mark_written(const at::Tensor& out) { out.unsafeGetTensorImpl()->bump_version(); }

}  // namespace fedtreelora
