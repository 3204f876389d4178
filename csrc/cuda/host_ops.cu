// CUDA-key registrations of linkage and cut_tree. Both are sequential, O(N^2) at most on inputs of a
// few kilobytes to megabytes (N clients), so they run on the host: copy the input to the CPU, call
// the CPU kernel through the dispatcher, and return the result on the input's device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "nvtx_range.h"

namespace fedtreelora {
namespace {

at::Tensor linkage_on_host(const at::Tensor& d, c10::string_view method) {
  // Its own name: the CPU kernel's "fedtreelora::linkage" range nests inside, the rest is copies.
  NvtxRange range("fedtreelora::linkage/cuda");
  static const auto cpu_linkage = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("fedtreelora::linkage", "")
                                      .typed<at::Tensor(const at::Tensor&, c10::string_view)>();
  return cpu_linkage.call(d.cpu(), method).to(d.device());
}

at::Tensor cut_tree_on_host(const at::Tensor& z, const at::Tensor& n_clusters) {
  NvtxRange range("fedtreelora::cut_tree/cuda");
  // The dispatcher picks this kernel when either argument is on CUDA; refuse a mix rather than guess.
  TORCH_CHECK_VALUE(z.device() == n_clusters.device(), "fedtreelora::cut_tree: z and n_clusters must be on one device, got z on ",
                    z.device(), " and n_clusters on ", n_clusters.device());
  static const auto cpu_cut_tree = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("fedtreelora::cut_tree", "")
                                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return cpu_cut_tree.call(z.cpu(), n_clusters.cpu()).to(z.device());
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("linkage", &fedtreelora::linkage_on_host);
  m.impl("cut_tree", &fedtreelora::cut_tree_on_host);
}
