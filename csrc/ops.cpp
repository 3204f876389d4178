// The schemas of every fedtreelora op, in one place. Kernels live in cpu/*.cpp and cuda/*.cu,
// one file per backend and op; Python wrappers, input checks and fake kernels in fedtreelora/ops.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(fedtreelora, m) {
  // x [N,P] client rows; layer l owns columns layer_offsets[l]:layer_offsets[l+1].
  // metric: "frobenius" | "cosine". Returns (per_layer [L,N,N] f32, mean over layers [N,N] f32).
  m.def("layer_distances(Tensor x, Tensor layer_offsets, str metric) -> (Tensor, Tensor)");
  // d [N,N] f64 symmetric with zero diagonal -> scipy's Z [N-1,4] f64.
  m.def("linkage(Tensor d, str method) -> Tensor");
  // z [N-1,4] f64, n_clusters int64 [M] -> labels int64 [M,N] (scipy cut_tree semantics).
  m.def("cut_tree(Tensor z, Tensor n_clusters) -> Tensor");
  // d [L,N,N], labels int64 [L,M,N] -> mean silhouette [L,M] f32 (NaN where undefined).
  m.def("silhouette(Tensor d, Tensor labels) -> Tensor");
  // x [N,P], layer_offsets int64 [L+1], labels int64 [L,N] in [0,n_clusters), weights [N] > 0
  // weights float64 (the wrapper converts) -> (cluster_mean [n_clusters,P], external_mean [n_clusters,P]) in x's dtype.
  m.def("tree_reduce(Tensor x, Tensor layer_offsets, Tensor labels, Tensor weights, int n_clusters) -> (Tensor, Tensor)");
  // Gathers many tensors into the columns of one buffer: out [N, W] (columns unit-stride, rows may be a
  // view of a wider buffer), parts key-major: parts[j * N + i] is key j of client i (row i), contiguous,
  // out's dtype and device, with key j's width w_j = parts[j * N].numel() for every client; key j fills
  // columns sum(w_<j) : sum(w_<=j), and the w_j sum to W. No part may overlap out. Writes only out.
  m.def("pack_rows(Tensor[] parts, Tensor(a!) out) -> ()");
}

// pack_rows writes its argument: torch's in-place checks, so that autograd sees the write. A leaf
// that requires grad is refused as out, and parts that require grad give out a history whose backward
// says "not implemented" instead of dropping it (the kernels bump out's version: op_checks.h). The
// other ops are functional and keep torch's default.
TORCH_LIBRARY_IMPL(fedtreelora, Autograd, m) { m.impl("pack_rows", torch::autograd::autogradNotImplementedFallback()); }
TORCH_LIBRARY_IMPL(fedtreelora, ADInplaceOrView, m) {
  m.impl("pack_rows", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}
