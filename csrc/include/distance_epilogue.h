// layer_distances, shared by its CPU (cpu/layer_distances.cpp) and CUDA (cuda/layer_distances.cu)
// entry points: the per-element epilogue math that turns a layer's Gram matrix into distances
// (__host__ __device__ under nvcc), and the host-side steps both run through ATen before it.
#pragma once

#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace fedtreelora {

FEDTREELORA_HD inline float square_root(float v) { return sqrtf(v); }
FEDTREELORA_HD inline double square_root(double v) { return sqrt(v); }

// ||a - b|| from ||a||^2, ||b||^2 and <a, b>. Rounding can leave a tiny negative square, which
// means 0. Written so that NaN passes through (the Python wrapper reports the client at fault).
template <typename T>
FEDTREELORA_HD inline T frobenius_distance(T sq_a, T sq_b, T dot) {
  const T sq = (sq_a + sq_b) - T(2) * dot;
  return sq < T(0) ? T(0) : square_root(sq);
}

// 1 - cos(a, b) in [0, 2]; a zero slice has similarity 0 to any other slice (distance 1).
template <typename T>
FEDTREELORA_HD inline T cosine_distance(T sq_a, T sq_b, T dot) {
  if (sq_a == T(0) || sq_b == T(0)) return T(1);
  const T d = T(1) - dot / (square_root(sq_a) * square_root(sq_b));
  return d < T(0) ? T(0) : (d > T(2) ? T(2) : d);
}

// Distance (i, j) from a row-major [n, n] Gram matrix, computed in double whatever the Gram's dtype
// (|a|^2 + |b|^2 - 2ab cancels: no further rounding on top of the GEMM's). Both (i, j) and (j, i)
// read the upper triangle, so the result is symmetric to the bit even where the GEMM's two
// triangles differ; the diagonal is exactly 0.
template <typename T>
FEDTREELORA_HD inline double pair_distance(const T* gram, int64_t n, int64_t i, int64_t j, bool cosine) {
  if (i == j) return 0.0;
  const int64_t a = i < j ? i : j;
  const int64_t b = i < j ? j : i;
  const double sq_a = gram[a * n + a], sq_b = gram[b * n + b], dot = gram[a * n + b];
  return cosine ? cosine_distance(sq_a, sq_b, dot) : frobenius_distance(sq_a, sq_b, dot);
}

}  // namespace fedtreelora

// Host-side steps, defined in cpu/layer_distances.cpp; ATen calls that run on x's device.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <vector>

namespace fedtreelora {

// TORCH_CHECKs on x (2-D, >= 1 row, float dtype), layer_offsets (int64 [L+1], 0 ... P, strictly
// increasing) and metric; returns the offsets on the host and sets `cosine`.
std::vector<int64_t> check_layer_distances_args(const at::Tensor& x, const at::Tensor& layer_offsets,
                                                c10::string_view metric, bool* cosine);

// rows @ rows.T [n, n] through library GEMM on rows' device, upper triangle and diagonal only
// (pair_distance never reads the rest, which is left uninitialised). Each backend prepares the rows
// first (its own prepared_rows): frobenius subtracts the column means, cosine scales rows to unit
// norm, both computed in float64, the result in float32 (float64 for float64 input).
at::Tensor upper_gram(const at::Tensor& rows);

// Frobenius only: when `peak`, the largest magnitude of the prepared rows (found while preparing
// them), is far from 1, multiplies them in place by a power of two (exact) so that the Gram's squares
// neither overflow nor underflow, and returns the factor that turns the distances computed from them
// back into true distances.
double rescale_rows(at::Tensor& rows, double peak);

}  // namespace fedtreelora
