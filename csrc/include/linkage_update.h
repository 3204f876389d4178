// Lance-Williams updates of agglomerative clustering: the distance from cluster i to the union of
// clusters x and y, given d(x,i), d(y,i), d(x,y) and the sizes. Each formula is written with the
// same operations in the same order as scipy's _hierarchy_distance_update.pxi, so that the heights
// come out equal to scipy's to the bit (this needs IEEE double without FMA contraction, which is
// what x86-64 compilers emit unless told -mfma/-march=native; the CMake build adds -ffp-contract=off).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

namespace fedtreelora {

enum class LinkageMethod { Single, Complete, Average, Weighted, Ward };

// Returns false for an unknown name (the caller reports it).
inline bool parse_linkage_method(const std::string& name, LinkageMethod* out) {
  if (name == "single") *out = LinkageMethod::Single;
  else if (name == "complete") *out = LinkageMethod::Complete;
  else if (name == "average") *out = LinkageMethod::Average;
  else if (name == "weighted") *out = LinkageMethod::Weighted;
  else if (name == "ward") *out = LinkageMethod::Ward;
  else return false;
  return true;
}

// Sizes are int, as in scipy: the integer sums are exact and convert to the same doubles.
template <LinkageMethod M>
inline double linkage_update(double d_xi, double d_yi, double d_xy, int size_x, int size_y, int size_i) {
  if constexpr (M == LinkageMethod::Single) {
    return std::min(d_xi, d_yi);
  } else if constexpr (M == LinkageMethod::Complete) {
    return std::max(d_xi, d_yi);
  } else if constexpr (M == LinkageMethod::Average) {
    return (size_x * d_xi + size_y * d_yi) / (size_x + size_y);
  } else if constexpr (M == LinkageMethod::Weighted) {
    return 0.5 * (d_xi + d_yi);
  } else {  // Ward
    const double t = 1.0 / (size_x + size_y + size_i);
    return std::sqrt((size_i + size_x) * t * d_xi * d_xi +
                     (size_i + size_y) * t * d_yi * d_yi -
                     size_i * t * d_xy * d_xy);
  }
}

}  // namespace fedtreelora
