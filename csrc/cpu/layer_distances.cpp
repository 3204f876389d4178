// layer_distances on CPU: per layer, the slice prepared with float64 arithmetic (centred or unit
// rows), its Gram matrix through library GEMM (at::mm on row blocks, upper triangle only), then a
// fused, row-parallel epilogue that writes the layer's distances and adds them into the float64 sum
// over layers. Also defines the host-side helpers the CUDA entry point shares (distance_epilogue.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "distance_epilogue.h"
#include "nvtx_range.h"

namespace fedtreelora {

std::vector<int64_t> check_layer_distances_args(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                c10::string_view metric, bool* cosine) {
  TORCH_CHECK_VALUE(metric == "frobenius" || metric == "cosine",
                    "layer_distances: metric must be 'frobenius' or 'cosine', got '", metric, "'");
  *cosine = metric == "cosine";
  TORCH_CHECK_VALUE(x.dim() == 2, "layer_distances: x must be 2-D [clients, parameters], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(x.size(0) >= 1, "layer_distances: x has no clients");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "layer_distances: x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(layer_offsets.scalar_type() == at::kLong,
                   "layer_distances: layer_offsets must be int64, got ", layer_offsets.scalar_type());
  TORCH_CHECK_VALUE(layer_offsets.dim() == 1 && layer_offsets.numel() >= 2,
                    "layer_distances: layer_offsets must be 1-D with at least 2 entries (L+1), got shape ",
                    layer_offsets.sizes());
  const at::Tensor host = layer_offsets.to(at::kCPU).contiguous();
  std::vector<int64_t> offsets(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  TORCH_CHECK_VALUE(offsets.front() == 0, "layer_distances: layer_offsets must start at 0, got ", offsets.front());
  TORCH_CHECK_VALUE(offsets.back() == x.size(1), "layer_distances: layer_offsets must end at the number of columns P=",
                    x.size(1), ", got ", offsets.back());
  for (size_t l = 0; l + 1 < offsets.size(); ++l) {
    TORCH_CHECK_VALUE(offsets[l] < offsets[l + 1], "layer_distances: layer_offsets must be strictly increasing: layer ",
                      l, " spans [", offsets[l], ", ", offsets[l + 1], ")");
  }
  return offsets;
}

at::Tensor upper_gram(const at::Tensor& rows) {
  // Only the upper triangle is read, so compute a staircase of row blocks against the columns from
  // the block's first row on: (k + 1) / 2k of the full GEMM for k blocks. The rest stays unwritten.
  constexpr int64_t kBlockRows = 256;
  const int64_t n = rows.size(0);
  at::Tensor gram = at::empty({n, n}, rows.options());
  for (int64_t start = 0; start < n; start += kBlockRows) {
    const int64_t count = std::min(kBlockRows, n - start);
    at::Tensor block = gram.narrow(0, start, count).narrow(1, start, n - start);
    at::mm_out(block, rows.narrow(0, start, count), rows.narrow(0, start, n - start).t());
  }
  return gram;
}

double rescale_rows(at::Tensor& rows, double peak) {
  constexpr int kComfortable = 24;  // |exponent| of the largest magnitude left alone (the common case)
  if (!std::isfinite(peak) || peak == 0.0) return 1.0;  // NaN/Inf propagate; all-equal rows give 0
  int exponent = 0;
  std::frexp(peak, &exponent);  // peak = m * 2^exponent, m in [0.5, 1)
  if (std::abs(exponent) <= kComfortable) return 1.0;
  const int limit = rows.scalar_type() == at::kDouble ? 1000 : 120;  // keep 2^-exponent representable
  exponent = std::max(-limit, std::min(limit, exponent));
  rows.mul_(std::ldexp(1.0, -exponent));
  return std::ldexp(1.0, exponent);
}

namespace {

// Each step reads the slice (any float dtype, unit column stride) and accumulates in double; fused
// by hand because ATen's mixed-dtype sum/sub/div would materialise float64 copies of it on CPU.

// Frobenius: the slice minus its column means (accumulated in double), in out_t.
// Returns the largest |value| written (NaN ignored: it propagates through the Gram anyway), so that
// rescale_rows needs no further read of the rows.
template <typename in_t, typename out_t>
double centre_columns(const at::Tensor& slice, at::Tensor& rows) {
  const int64_t n = slice.size(0), w = slice.size(1), row_stride = slice.stride(0);
  const in_t* src = slice.const_data_ptr<in_t>();
  out_t* dst = rows.data_ptr<out_t>();
  std::vector<double> peaks(static_cast<size_t>(at::get_num_threads()), 0.0);
  at::parallel_for(0, w, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> mean(end - begin, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = begin; c < end; ++c) mean[c - begin] += static_cast<double>(src[i * row_stride + c]);
    }
    for (double& m : mean) m /= static_cast<double>(n);
    double peak = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = begin; c < end; ++c) {
        const out_t v = static_cast<out_t>(static_cast<double>(src[i * row_stride + c]) - mean[c - begin]);
        dst[i * w + c] = v;
        peak = std::max(peak, std::abs(static_cast<double>(v)));
      }
    }
    double& mine = peaks[static_cast<size_t>(at::get_thread_num())];
    mine = std::max(mine, peak);
  });
  return *std::max_element(peaks.begin(), peaks.end());
}

// Cosine: each row divided by its norm, in out_t; zero rows stay zero. Rows are divided by their
// largest magnitude first, so that the squares neither overflow nor underflow even in double.
template <typename in_t, typename out_t>
void normalise_rows(const at::Tensor& slice, at::Tensor& rows) {
  const int64_t n = slice.size(0), w = slice.size(1), row_stride = slice.stride(0);
  const in_t* src = slice.const_data_ptr<in_t>();
  out_t* dst = rows.data_ptr<out_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / w), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const in_t* row = src + i * row_stride;
      double peak = 0.0;
      for (int64_t c = 0; c < w; ++c) peak = std::max(peak, std::abs(static_cast<double>(row[c])));
      if (peak == 0.0) peak = 1.0;  // a zero row stays zero
      double sum_sq = 0.0;
      for (int64_t c = 0; c < w; ++c) {
        const double v = static_cast<double>(row[c]) / peak;
        sum_sq += v * v;
      }
      const double inverse = sum_sq == 0.0 ? 0.0 : 1.0 / std::sqrt(sum_sq);  // sum_sq >= 1 unless zero
      for (int64_t c = 0; c < w; ++c) dst[i * w + c] = static_cast<out_t>(static_cast<double>(row[c]) / peak * inverse);
    }
  });
}

// One layer's slice [n, w] made ready for the Gram trick, in float32 (float64 for float64 input):
// frobenius subtracts the column means (distances are translation invariant; a large common offset
// would otherwise cancel catastrophically), cosine scales rows to unit norm (scale invariant; no
// overflow or underflow in the squares).
// The rows the Gram is taken of, and for frobenius their largest |value| (what rescale_rows needs).
at::Tensor prepared_rows(const at::Tensor& layer_slice, bool cosine, double* peak) {
  const at::Tensor slice = layer_slice.stride(1) == 1 ? layer_slice : layer_slice.contiguous();
  at::Tensor rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, slice.scalar_type(), "layer_distances", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rows = at::empty(slice.sizes(), slice.options().dtype(c10::CppTypeToScalarType<out_t>::value));
    if (cosine) {
      normalise_rows<scalar_t, out_t>(slice, rows);
    } else {
      *peak = centre_columns<scalar_t, out_t>(slice, rows);
    }
  });
  return rows;
}

template <typename T>
void distance_epilogue(const T* gram, float* out, double* total, int64_t n, bool cosine, double scale) {
  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // rows per task: enough work to pay for a thread
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const double d = static_cast<double>(pair_distance(gram, n, i, j, cosine)) * scale;
        out[i * n + j] = static_cast<float>(d);
        total[i * n + j] += d;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> layer_distances_cpu(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                       c10::string_view metric) {
  NvtxRange range("fedtreelora::layer_distances");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "layer_distances (CPU kernel): x must be a CPU tensor, got ", x.device());
  bool cosine = false;
  const std::vector<int64_t> offsets = check_layer_distances_args(x, layer_offsets, metric, &cosine);
  const int64_t n = x.size(0);
  const int64_t layers = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor per_layer = at::empty({layers, n, n}, x.options().dtype(at::kFloat));
  at::Tensor total = at::zeros({n, n}, x.options().dtype(at::kDouble));
  for (int64_t l = 0; l < layers; ++l) {
    double peak = 0.0;
    at::Tensor rows = prepared_rows(x.narrow(1, offsets[l], offsets[l + 1] - offsets[l]), cosine, &peak);
    const double scale = cosine ? 1.0 : rescale_rows(rows, peak);
    const at::Tensor gram = upper_gram(rows);
    float* out = per_layer.data_ptr<float>() + l * n * n;
    if (gram.scalar_type() == at::kDouble) {
      distance_epilogue(gram.data_ptr<double>(), out, total.data_ptr<double>(), n, cosine, scale);
    } else {
      distance_epilogue(gram.data_ptr<float>(), out, total.data_ptr<double>(), n, cosine, scale);
    }
  }
  return {per_layer, total.div_(layers).to(at::kFloat)};
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) {
  m.impl("layer_distances", &fedtreelora::layer_distances_cpu);
}
