// CPU kernel of fedtreelora::tree_reduce: weighted cluster means and external means of client rows,
// with one partition per layer, in a single read of x. Work items are (layer, column chunk): a
// thread streams x[:, chunk] for every client, cluster by cluster, into a small [C, chunk] double
// accumulator that stays in cache; external sums are the column totals minus the cluster sums. No
// per-client copies, no one-hot matrices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "nvtx_range.h"
#include "op_checks.h"
#include "tree_reduce_groups.h"
#include "tree_reduce_math.h"

namespace fedtreelora {
namespace {

// Column chunks: a thread reads x[:, chunk] row by row, so each client's read is `chunk` contiguous
// values; short reads (a few KB, each in its own page) starve the hardware prefetchers, so chunks are
// wide (64 KB of float32 per client). Only one cluster's [chunk] double accumulator is live at a
// time (in L2); the [C + 1, chunk] buffer that keeps them for the epilogue is touched twice per
// chunk and sized for L3.
constexpr int64_t kAccumulatorBytes = 4 * 1024 * 1024;
constexpr int64_t kMaxChunk = 16384;
constexpr int64_t kMinChunk = 64;

struct Chunk {
  int64_t layer, begin, end;
};

// dst[j] += sum over the given rows of w_i * x_i[j]. Eight clients per pass: the accumulator row is
// loaded and stored once per eight rows of x read (then four, then one for the rest).
template <typename scalar_t>
__attribute__((always_inline)) inline void add_weighted_rows_impl(const scalar_t* const* x, const double* w,
                                                                  int64_t count, double* __restrict__ dst,
                                                                  int64_t width) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const scalar_t* __restrict__ x0 = x[i];
    const scalar_t* __restrict__ x1 = x[i + 1];
    const scalar_t* __restrict__ x2 = x[i + 2];
    const scalar_t* __restrict__ x3 = x[i + 3];
    const scalar_t* __restrict__ x4 = x[i + 4];
    const scalar_t* __restrict__ x5 = x[i + 5];
    const scalar_t* __restrict__ x6 = x[i + 6];
    const scalar_t* __restrict__ x7 = x[i + 7];
    const double w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
    const double w4 = w[i + 4], w5 = w[i + 5], w6 = w[i + 6], w7 = w[i + 7];
    for (int64_t j = 0; j < width; ++j)
      dst[j] += ((w0 * static_cast<double>(x0[j]) + w1 * static_cast<double>(x1[j])) +
                 (w2 * static_cast<double>(x2[j]) + w3 * static_cast<double>(x3[j]))) +
                ((w4 * static_cast<double>(x4[j]) + w5 * static_cast<double>(x5[j])) +
                 (w6 * static_cast<double>(x6[j]) + w7 * static_cast<double>(x7[j])));
  }
  for (; i + 4 <= count; i += 4) {
    const scalar_t* __restrict__ x0 = x[i];
    const scalar_t* __restrict__ x1 = x[i + 1];
    const scalar_t* __restrict__ x2 = x[i + 2];
    const scalar_t* __restrict__ x3 = x[i + 3];
    const double w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
    for (int64_t j = 0; j < width; ++j)
      dst[j] += w0 * static_cast<double>(x0[j]) + w1 * static_cast<double>(x1[j]) + w2 * static_cast<double>(x2[j]) +
                w3 * static_cast<double>(x3[j]);
  }
  for (; i < count; ++i) {
    const scalar_t* __restrict__ xi = x[i];
    const double wi = w[i];
    for (int64_t j = 0; j < width; ++j) dst[j] += wi * static_cast<double>(xi[j]);
  }
}

// Compiled for AVX-512 and AVX2 as well as the baseline ISA, picked at load time (GCC's target_clones
// on x86-64 Linux): the loop is convert + multiply-add bound at 2 doubles per SSE2 instruction.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FEDTREELORA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FEDTREELORA_CLONES
#endif
#define FEDTREELORA_ADD_ROWS(scalar_t)                                                                        \
  FEDTREELORA_CLONES void add_weighted_rows(const scalar_t* const* x, const double* w, int64_t count,       \
                                            double* __restrict__ dst, int64_t width) {                        \
    add_weighted_rows_impl(x, w, count, dst, width);                                                          \
  }
FEDTREELORA_ADD_ROWS(float)
FEDTREELORA_ADD_ROWS(double)
FEDTREELORA_ADD_ROWS(at::Half)
FEDTREELORA_ADD_ROWS(at::BFloat16)
#undef FEDTREELORA_ADD_ROWS

// Chunks never cross a layer (a layer has one partition). At least 4 chunks per thread when the
// columns allow it, so that the threads stay balanced.
std::vector<Chunk> column_chunks(const int64_t* offsets, int64_t n_layers, int64_t n_clusters) {
  const int64_t budget = kAccumulatorBytes / (static_cast<int64_t>(sizeof(double)) * (n_clusters + 1));
  const int64_t balanced = offsets[n_layers] / (4 * static_cast<int64_t>(at::get_num_threads()));
  const int64_t width = std::max(kMinChunk, std::min({kMaxChunk, budget, (balanced + 15) / 16 * 16}));
  std::vector<Chunk> chunks;
  for (int64_t l = 0; l < n_layers; ++l)
    for (int64_t c0 = offsets[l]; c0 < offsets[l + 1]; c0 += width)
      chunks.push_back({l, c0, std::min(offsets[l + 1], c0 + width)});
  return chunks;
}

// Returns false if a sum or an external mean is not finite (x holds NaN or Inf, or float64
// overflowed, which (total - cluster sum) can do even when both are finite): the caller then raises,
// and the outputs are not used. Checking in float64 here, where the values are in cache, spares the
// wrapper a pass over both outputs. A finite mean of values of x's dtype lies within that dtype's
// range, so the casts below cannot overflow.
template <typename scalar_t>
bool reduce_chunks(const scalar_t* x, int64_t row_stride, const double* weights, const LayerClusters& lc,
                   const std::vector<Chunk>& chunks, int64_t n, int64_t n_clusters, int64_t p, scalar_t* cluster_out,
                   scalar_t* external_out) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc, total;
    std::vector<const scalar_t*> rows(n);
    std::vector<double> row_weight(n);
    for (int64_t item = begin; item < end; ++item) {
      const Chunk ch = chunks[item];
      const int64_t w = ch.end - ch.begin;
      const int32_t* members = lc.members.data() + ch.layer * n;
      const int64_t* start = lc.start.data() + ch.layer * (n_clusters + 1);
      for (int64_t t = 0; t < n; ++t) {  // clients in cluster order
        rows[t] = x + members[t] * row_stride + ch.begin;
        row_weight[t] = weights[members[t]];
      }
      acc.assign(n_clusters * w, 0.0);
      for (int64_t c = 0; c < n_clusters; ++c)  // together, the one read of x[:, chunk]
        add_weighted_rows(rows.data() + start[c], row_weight.data() + start[c], start[c + 1] - start[c],
                          acc.data() + c * w, w);
      const double* cweight = lc.weight.data() + ch.layer * n_clusters;
      total.assign(w, 0.0);
      for (int64_t c = 0; c < n_clusters; ++c) {
        if (start[c + 1] == start[c]) continue;
        const double* row = acc.data() + c * w;
        for (int64_t j = 0; j < w; ++j) total[j] += row[j];
      }
      bool ok = true;
      for (int64_t j = 0; j < w; ++j) ok &= std::isfinite(total[j]);
      for (int64_t c = 0; c < n_clusters; ++c) {
        const int64_t count = start[c + 1] - start[c];
        const double* row = acc.data() + c * w;
        scalar_t* cl = cluster_out + c * p + ch.begin;
        scalar_t* ex = external_out + c * p + ch.begin;
        const double cw = cweight[c], tw = lc.total[ch.layer];
        for (int64_t j = 0; j < w; ++j) {  // the branches of tree_reduce_math.h are loop-invariant
          const double external = external_mean(total[j], row[j], tw, cw, count, n);
          ok &= std::isfinite(row[j]) & std::isfinite(external);
          cl[j] = static_cast<scalar_t>(cluster_mean(row[j], cw, count));
          ex[j] = static_cast<scalar_t>(external);
        }
      }
      if (!ok) finite = false;
    }
  });
  return finite;
}

std::tuple<at::Tensor, at::Tensor> tree_reduce_cpu(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                   const at::Tensor& labels, const at::Tensor& weights,
                                                   int64_t n_clusters) {
  NvtxRange range("fedtreelora::tree_reduce");
  for (const at::Tensor* t : {&x, &layer_offsets, &labels, &weights})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "tree_reduce: x, layer_offsets, labels and weights must be CPU tensors");
  const std::vector<int64_t> offsets = check_tree_reduce_args(x, layer_offsets, labels, weights, n_clusters);
  const int64_t n = x.size(0), p = x.size(1), n_layers = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t* o = offsets.data();

  const at::Tensor lab = labels.contiguous();
  const at::Tensor w = weights.contiguous();
  const LayerClusters lc = group_clients(lab.data_ptr<int64_t>(), w.data_ptr<double>(), n_layers, n, n_clusters);
  const std::vector<Chunk> chunks = column_chunks(o, n_layers, n_clusters);
  // Rows may be strided (a slice of a wider tensor) without a copy; columns must be unit-stride.
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor cluster = at::empty({n_clusters, p}, x.options());
  at::Tensor external = at::empty({n_clusters, p}, x.options());
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_reduce_cpu", [&] {
    finite = reduce_chunks(xs.data_ptr<scalar_t>(), xs.stride(0), w.data_ptr<double>(), lc, chunks, n, n_clusters, p,
                           cluster.data_ptr<scalar_t>(), external.data_ptr<scalar_t>());
  });
  // The wrapper (fedtreelora.ops.tree_reduce) turns this into a message naming the client and layer.
  TORCH_CHECK_VALUE(finite, "tree_reduce: x has NaN or Inf values, or its sums overflow float64");
  return {cluster, external};
}

}  // namespace

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) { m.impl("tree_reduce", &tree_reduce_cpu); }

}  // namespace fedtreelora
