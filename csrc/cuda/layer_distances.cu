// layer_distances on CUDA: per layer, the rows prepared through ATen and the same staircase Gram as
// on CPU (cuBLAS through at::mm), then an epilogue kernel with one thread per (i, j) that writes the layer's
// distances and adds them into the float64 sum over layers. The per-element math is shared with the
// CPU kernel through distance_epilogue.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include "distance_epilogue.h"
#include "nvtx_range.h"

namespace fedtreelora {
namespace {


// Full float32 for the Gram GEMM whatever the caller chose: with TF32 on (HF Trainer's tf32=True,
// torch.backends.cuda.matmul.allow_tf32) cuBLAS rounds the inputs to 10 mantissa bits, and
// |a|^2 + |b|^2 - 2ab turns that ~5e-4 rounding into large relative errors for near-identical
// clients, the normal case. Saves the setting, forces IEEE float32, restores it on scope exit
// (also when the GEMM throws). The setting is process-wide: another thread's matmuls during this
// op run in full float32 too, which is only slower, never less accurate.
class FullFloat32Matmul {
 public:
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  FullFloat32Matmul() : saved_(at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL)) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  }
  ~FullFloat32Matmul() {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, saved_);
  }

 private:
  at::Float32Precision saved_;
#else
  FullFloat32Matmul() : saved_(at::globalContext().allowTF32CuBLAS()) { at::globalContext().setAllowTF32CuBLAS(false); }
  ~FullFloat32Matmul() { at::globalContext().setAllowTF32CuBLAS(saved_); }

 private:
  bool saved_;
#endif
 public:
  FullFloat32Matmul(const FullFloat32Matmul&) = delete;
  FullFloat32Matmul& operator=(const FullFloat32Matmul&) = delete;
};

// One layer's slice [n, w] made ready for the Gram trick (see upper_gram in distance_epilogue.h),
// in float32 (float64 for float64 input); ATen's CUDA kernels compute the mixed-dtype steps in
// float64 on the fly.
at::Tensor prepared_rows(const at::Tensor& slice, bool cosine) {
  const auto compute = slice.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty(slice.sizes(), slice.options().dtype(compute));
  if (cosine) {
    // Divided by the row's largest magnitude first: no overflow or underflow in the squares.
    const at::Tensor peak = at::amax(at::abs(slice), {1}, /*keepdim=*/true).to(at::kDouble);
    at::div_out(rows, slice, peak.masked_fill(peak == 0, 1));  // zero rows stay zero
    const at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true, at::kDouble);
    rows.div_(norms.masked_fill(norms == 0, 1));
  } else {
    const at::Tensor column_mean = at::sum(slice, {0}, /*keepdim=*/true, at::kDouble).div_(slice.size(0));
    at::sub_out(rows, slice, column_mean);
  }
  return rows;
}

// The device twin of rescale_rows (cpu/layer_distances.cpp), with the same rule and no host sync:
// when the largest magnitude's exponent is beyond +-24, the rows are divided by that power of two
// (exact) and the returned 0-dim double factor, read by the epilogue kernel, multiplies it back.
at::Tensor rescale_rows_on_device(at::Tensor& rows) {
  constexpr int kComfortable = 24;
  const double limit = rows.scalar_type() == at::kDouble ? 1000.0 : 120.0;  // keep 2^-exponent representable
  const at::Tensor peak = at::linalg_vector_norm(rows, INFINITY, {}, false, at::kDouble);
  const at::Tensor exponent = std::get<1>(at::frexp(peak)).to(at::kDouble);
  const at::Tensor rescale = exponent.abs().gt(kComfortable).logical_and_(at::isfinite(peak)).logical_and_(peak.ne(0));
  const at::Tensor factor = at::where(rescale, at::exp2(exponent.clamp(-limit, limit)), at::ones_like(peak));
  rows.div_(factor.to(rows.scalar_type()));
  return factor;
}

// One 32 x 32 tile of the output per block (32 x 8 threads, 4 rows each), indexed by a 2-D grid: no
// 64-bit division per element. Tiles above the diagonal read the Gram's upper triangle in place,
// coalesced. A tile below it needs the transposed tile of the upper triangle: it is read coalesced
// into shared memory and read back transposed, so neither half of the output reads the Gram with a
// stride of n. Every (i, j) and (j, i) use the same three Gram entries (symmetric to the bit).
constexpr int kTileDim = 32;
constexpr int kTileRows = 8;

template <typename T>
__global__ void __launch_bounds__(kTileDim* kTileRows) distance_epilogue_kernel(const T* __restrict__ gram,
                                                                               float* __restrict__ out,
                                                                               double* __restrict__ total, int64_t n,
                                                                               bool cosine,
                                                                               const double* __restrict__ scale) {
  __shared__ T dots[kTileDim][kTileDim + 1];  // +1: no bank conflicts on the transposed read
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileDim, col0 = static_cast<int64_t>(blockIdx.x) * kTileDim;
  const bool below = row0 > col0;  // the whole tile is below the diagonal (tiles are square and aligned)
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  if (below) {  // dots[c][r] = gram[col0 + c, row0 + r]: the mirror tile, read row by row
    for (int k = ty; k < kTileDim; k += kTileRows) {
      const int64_t gi = col0 + k, gj = row0 + tx;
      if (gi < n && gj < n) dots[k][tx] = gram[gi * n + gj];
    }
  }
  __syncthreads();
  const int64_t j = col0 + tx;
  if (j >= n) return;  // no barrier below
  const double factor = *scale;
  const double sq_j = static_cast<double>(gram[j * n + j]);
  for (int k = ty; k < kTileDim; k += kTileRows) {
    const int64_t i = row0 + k;
    if (i >= n) break;
    double d = 0.0;
    if (i != j) {
      const double sq_i = static_cast<double>(gram[i * n + i]);
      // below: (i, j) with j < i uses gram[j, i] = dots[tx][k]; above or on the diagonal tile, i < j
      // reads gram[i, j] (coalesced over j), and i > j there falls back to the mirror entry directly.
      const double dot = below ? static_cast<double>(dots[tx][k])
                               : static_cast<double>(i < j ? gram[i * n + j] : gram[j * n + i]);
      const double sq_a = i < j ? sq_i : sq_j, sq_b = i < j ? sq_j : sq_i;
      d = (cosine ? cosine_distance(sq_a, sq_b, dot) : frobenius_distance(sq_a, sq_b, dot)) * factor;
    }
    out[i * n + j] = static_cast<float>(d);
    total[i * n + j] += d;
  }
}

template <typename T>
void launch_epilogue(const at::Tensor& gram, float* out, at::Tensor& total, int64_t n, bool cosine,
                     const at::Tensor& scale) {
  const int64_t tiles = (n + kTileDim - 1) / kTileDim;
  TORCH_CHECK_VALUE(tiles <= 65535, "layer_distances: too many clients for one CUDA grid (", n, ")");
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(tiles));
  const dim3 block(kTileDim, kTileRows);
  distance_epilogue_kernel<T><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      gram.data_ptr<T>(), out, total.data_ptr<double>(), n, cosine, scale.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> layer_distances_cuda(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                        c10::string_view metric) {
  NvtxRange range("fedtreelora::layer_distances");
  TORCH_CHECK_VALUE(x.is_cuda(), "layer_distances (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  bool cosine = false;
  const std::vector<int64_t> offsets = check_layer_distances_args(x, layer_offsets, metric, &cosine);
  const int64_t n = x.size(0);
  const int64_t layers = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor per_layer = at::empty({layers, n, n}, x.options().dtype(at::kFloat));
  at::Tensor total = at::zeros({n, n}, x.options().dtype(at::kDouble));
  const FullFloat32Matmul full_float32;  // for every layer's Gram
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor rows = prepared_rows(x.narrow(1, offsets[l], offsets[l + 1] - offsets[l]), cosine);
    // Cosine rows are unit length; frobenius rows are rescaled on the device, without a host sync.
    const at::Tensor scale = cosine ? at::ones({}, x.options().dtype(at::kDouble)) : rescale_rows_on_device(rows);
    const at::Tensor gram = upper_gram(rows);
    float* out = per_layer.data_ptr<float>() + l * n * n;
    if (gram.scalar_type() == at::kDouble) {
      launch_epilogue<double>(gram, out, total, n, cosine, scale);
    } else {
      launch_epilogue<float>(gram, out, total, n, cosine, scale);
    }
  }
  return {per_layer, total.div_(layers).to(at::kFloat)};
}

}  // namespace
}  // namespace fedtreelora

TORCH_LIBRARY_IMPL(fedtreelora, CUDA, m) {
  m.impl("layer_distances", &fedtreelora::layer_distances_cuda);
}
