// Portable short vectors for the CPU kernels: GCC/clang vector extensions (lowered to SSE2 on a
// plain x86-64 build, AVX where the compiler targets it, NEON on arm64), with a plain-loop fallback
// elsewhere. Only elementwise arithmetic, comparisons and one 8x8 transpose are used.
#pragma once

#include <cstdint>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && !defined(FEDTREELORA_NO_SIMD)
#define FEDTREELORA_SIMD 1
#else
#define FEDTREELORA_SIMD 0
#endif

namespace fedtreelora {
namespace simd {

#if FEDTREELORA_SIMD
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));

// GCC >= 12 and clang have __builtin_shufflevector; older GCC has __builtin_shuffle with a mask vector.
#if defined(__clang__) || __GNUC__ >= 12
#define FEDTREELORA_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FEDTREELORA_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, ::fedtreelora::simd::i8{__VA_ARGS__})
#endif

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

// to[0..3] += from[0..3] converted to double (exact).
inline void add4_widened(double* to, const float* from) {
  f4 x;
  d4 acc;
  std::memcpy(&x, from, sizeof(x));
  std::memcpy(&acc, to, sizeof(acc));
  acc += __builtin_convertvector(x, d4);
  std::memcpy(to, &acc, sizeof(acc));
}

// Lanes where a and b are both >= 0 and agree up to round-off: symmetric_within_roundoff<float>
// (silhouette_math.h) with the same operations in the same order, so both give the same answer.
inline i8 agree8(f8 a, f8 b) {
  const f8 lo = a < b ? a : b;
  const f8 diff = a > b ? a - b : b - a;
  const f8 mag = lo < 0.0f ? -lo : lo;
  return (a >= 0.0f) & (b >= 0.0f) & (diff <= 1e-10f + 1e-5f * mag);
}

// r[0..7] := its transpose, in three butterfly stages of 8 two-input shuffles each.
inline void transpose8(f8* r) {
  for (int i = 0; i < 4; ++i) {  // swap the off-diagonal 4x4 blocks
    const f8 x = r[i], y = r[i + 4];
    r[i] = FEDTREELORA_SHUFFLE(x, y, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = FEDTREELORA_SHUFFLE(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i : {0, 1, 4, 5}) {  // then the 2x2 blocks inside each 4x4
    const f8 x = r[i], y = r[i + 2];
    r[i] = FEDTREELORA_SHUFFLE(x, y, 0, 1, 8, 9, 4, 5, 12, 13);
    r[i + 2] = FEDTREELORA_SHUFFLE(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i : {0, 2, 4, 6}) {  // then the single elements
    const f8 x = r[i], y = r[i + 1];
    r[i] = FEDTREELORA_SHUFFLE(x, y, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = FEDTREELORA_SHUFFLE(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  }
}
#endif

}  // namespace simd
}  // namespace fedtreelora
