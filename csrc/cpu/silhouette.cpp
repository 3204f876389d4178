// CPU kernel of fedtreelora::silhouette: the mean silhouette of M partitions under each of L
// distance matrices. One pass over d, row by row, sums every row's distances per class of the
// partitions' common refinement; every partition's cluster sums are sums of those (O(classes)), and
// a, b and s follow. O(N^2 + M N R) per layer for R refined classes (nested cuts of one tree: R = the
// finest cut's count), accumulated in double (with few classes, in float lanes of at most 16
// entries each first: a bound below, kLaneEntries). The same pass checks d's contract (finite,
// non-negative, zero diagonal: silhouette_math.h), so the wrapper makes no scan of its own.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "nvtx_range.h"
#include "op_checks.h"
#include "silhouette_math.h"
#include "silhouette_partitions.h"

namespace fedtreelora {
namespace {

// The pass reads d row by row, each row once and in order (the memory floor: the prefetchers stream
// it, and the row sits in L1 while it is used twice). A row is first checked (finite, >= 0: one
// vectorised compare per entry), then summed per class of the refinement by walking the members of
// each class in increasing client order (a gather inside the row, in double with eight independent
// accumulators, so the adds do not wait on each other), or, with few classes, by masks in the same
// pass as the check (masked_class_sums below); every partition's cluster sums, a, b and s follow
// from the class sums, once a block's rows are summed. Rows are independent: blocks of rows are the
// work items.
constexpr int64_t kRowsPerItem = 32;

// Machine epsilon of the input dtype: the diagonal may be 100 of them from 0 (sklearn).
template <typename scalar_t>
double diagonal_tolerance() {
  return 100.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
}

// Whether every entry of the row is finite and >= 0 (the comparisons are false for NaN). 16-bit
// input is compared after the exact conversion to float.
template <typename scalar_t>
__attribute__((always_inline)) inline bool row_in_contract_impl(const scalar_t* row, int64_t n) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const T top = std::numeric_limits<T>::max();
  int ok = 1;
  for (int64_t j = 0; j < n; ++j) {
    const T v = static_cast<T>(row[j]);
    ok &= (v >= T(0)) & (v <= top);
  }
  return ok != 0;
}

// sums[r] = sum of row[j] over the members j of class r, in double: eight independent accumulators,
// so that the adds do not wait on each other's latency.
template <typename scalar_t>
__attribute__((always_inline)) inline void class_sums_impl(const scalar_t* __restrict__ row,
                                                           const int32_t* __restrict__ members,
                                                           const int64_t* __restrict__ start, int64_t n_classes,
                                                           double* __restrict__ sums) {
  for (int64_t r = 0; r < n_classes; ++r) {
    const int32_t* m = members + start[r];
    const int64_t count = start[r + 1] - start[r];
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t t = 0;
    for (; t + 8 <= count; t += 8)
      for (int u = 0; u < 8; ++u) s[u] += static_cast<double>(row[m[t + u]]);
    for (; t < count; ++t) s[0] += static_cast<double>(row[m[t]]);
    sums[r] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }
}

// Refinements of at most kMaskedClasses classes (nested cuts of a tree: the finest cut's count) are
// summed by masks instead, on float input where AVX-512 is there: the row is read once, in order,
// each vector of 16 entries is checked and added into every class's lanes under a compare with the
// entries' class ids. One compare and one masked add per class per 16 entries, against a scalar
// load per entry for the gathers: per row, 3x faster with 1 class, 1.7x with 4, 1.2x with 6, a tie
// with 8 (N=1000, rows in L2), and with the check fused the row is read once. Intrinsics, because GCC 12 turns
// the same vector compares written in plain C++ (or its vector extensions) into scalar code.
// The sums are in float lanes, flushed to double totals (kLaneEntries below); a row whose float
// sums are not finite (entries near FLT_MAX) is summed again by the exact double path.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
constexpr int64_t kMaskedClasses = 6;
#if !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12's intrinsics headers trip it (_mm512_undefined_pd)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Adds the entries x of one vector (class ids c) into the float lanes of their class: one compare and
// one masked add per class (the masked adds are the bound: about one a cycle on Zen 4, where a masked
// FMA x * 1 + part on the other pipes measured slower, and precomputed masks loaded per vector too).
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void add_by_class(__m512 (&part)[R], __m512 x, __m512i c) {
  for (int r = 0; r < R; ++r)
    part[r] = _mm512_mask_add_ps(part[r], _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(r)), part[r], x);
}

// total[r] += the 16 float lanes of part[r], converted (exactly) to double.
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void flush_to_double(__m512d (&total)[R], const __m512 (&part)[R]) {
  for (int r = 0; r < R; ++r) {
    const __m256 low = _mm512_castps512_ps256(part[r]);
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(part[r]), 1));
    total[r] = _mm512_add_pd(total[r], _mm512_add_pd(_mm512_cvtps_pd(low), _mm512_cvtps_pd(high)));
  }
}

// Float lanes add at most kLaneEntries entries each before they are added to the double totals: a
// class sum's relative error is then under (kLaneEntries - 1) * 2^-24 < 9e-7 (the entries are >= 0,
// so the error of a sum of class sums stays under that fraction of it too), and a score's under
// 2 * 9e-7 (s = 1 - a/b or b/a - 1), far inside the 1e-5 the scores are held to. Two sets of lanes,
// for the even and the odd vectors of a row, so that the adds into one class do not wait on each
// other's latency.
constexpr int64_t kLaneEntries = 16;

template <int R>
__attribute__((target("avx512f"))) inline bool masked_class_sums_avx512(const float* row, const int32_t* cls,
                                                                       int64_t n, double* sums) {
  __m512d total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_pd();
  __m512i top = _mm512_setzero_si512();  // the largest bit pattern seen, as unsigned
  int64_t j = 0;
  while (j < n) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    const int64_t stop = std::min(n, j + 2 * kLaneEntries * 16);
    for (; j + 32 <= stop; j += 32) {
      __m512 x = _mm512_loadu_ps(row + j), y = _mm512_loadu_ps(row + j + 16);
      __m512i cx = _mm512_loadu_si512(cls + j), cy = _mm512_loadu_si512(cls + j + 16);
      // Kept in registers: GCC otherwise folds a load into every instruction that uses the vector
      // (3 loads of x, 2 of its class ids), and the loads become the bound (1.3-2x slower, R <= 2).
      asm("" : "+v"(x), "+v"(y), "+v"(cx), "+v"(cy));
      top = _mm512_max_epu32(top, _mm512_max_epu32(_mm512_castps_si512(x), _mm512_castps_si512(y)));
      add_by_class(even, x, cx);
      add_by_class(odd, y, cy);
    }
    // The row's last 1..31 entries (stop = n here): a full vector into the even lanes, then a partial
    // one into the odd lanes, which loads zeros past the row's end (they pass the check, add nothing).
    if (j + 16 <= stop) {
      const __m512 x = _mm512_loadu_ps(row + j);
      top = _mm512_max_epu32(top, _mm512_castps_si512(x));
      add_by_class(even, x, _mm512_loadu_si512(cls + j));
      j += 16;
    }
    if (j < stop) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << (stop - j)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(lanes, row + j);
      top = _mm512_max_epu32(top, _mm512_castps_si512(x));
      add_by_class(odd, x, _mm512_maskz_loadu_epi32(lanes, cls + j));
      j = stop;
    }
    flush_to_double(total, even);
    flush_to_double(total, odd);
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_pd(total[r]);
  // Finite floats >= +0 are the bit patterns 0 .. 0x7f7fffff: anything above is negative, Inf or NaN
  // (or -0, which is allowed: the caller then checks the row exactly). One max per vector.
  return _mm512_reduce_max_epu32(top) <= 0x7f7fffffu;
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// sums[r] for the classes r < n_classes <= kMaskedClasses of the row (class_of: each client's class);
// false if an entry is NaN, Inf, negative or -0 (the sums are complete either way).
__attribute__((target("avx512f"))) bool masked_class_sums(const float* row, const int32_t* class_of, int64_t n,
                                                           int64_t n_classes, double* sums) {
  switch (n_classes) {
    case 1: return masked_class_sums_avx512<1>(row, class_of, n, sums);
    case 2: return masked_class_sums_avx512<2>(row, class_of, n, sums);
    case 3: return masked_class_sums_avx512<3>(row, class_of, n, sums);
    case 4: return masked_class_sums_avx512<4>(row, class_of, n, sums);
    case 5: return masked_class_sums_avx512<5>(row, class_of, n, sums);
    default: return masked_class_sums_avx512<6>(row, class_of, n, sums);
  }
}

// Whether layer rows of this dtype with this many classes take the masked path.
template <typename scalar_t>
bool use_masked_sums(int64_t n_classes) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return std::is_same_v<scalar_t, float> && avx512 && n_classes <= kMaskedClasses;
}
#else
template <typename scalar_t>
bool use_masked_sums(int64_t) { return false; }
inline bool masked_class_sums(const float*, const int32_t*, int64_t, int64_t, double*) { return false; }  // not called
#endif

// Both compiled for AVX-512 and AVX2 as well as the baseline ISA, picked at load time (GCC's
// target_clones, x86-64 Linux): the check is a vector compare per 4, 8 or 16 entries.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FEDTREELORA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FEDTREELORA_CLONES
#endif
#define FEDTREELORA_ROW_KERNELS(scalar_t)                                                                       \
  FEDTREELORA_CLONES bool row_in_contract(const scalar_t* row, int64_t n) { return row_in_contract_impl(row, n); } \
  FEDTREELORA_CLONES void class_sums(const scalar_t* row, const int32_t* members, const int64_t* start,          \
                                     int64_t n_classes, double* sums) {                                          \
    class_sums_impl(row, members, start, n_classes, sums);                                                       \
  }
FEDTREELORA_ROW_KERNELS(float)
FEDTREELORA_ROW_KERNELS(double)
FEDTREELORA_ROW_KERNELS(at::Half)
FEDTREELORA_ROW_KERNELS(at::BFloat16)
#undef FEDTREELORA_ROW_KERNELS

// Runs worker(take) on torch's intra-op threads (at most count of them), where take() hands out the
// items 0, 1, 2, ... one at a time from a shared counter (a worker loops until take() >= count).
// Not one fixed range per thread: on a busy machine a thread that loses its core for a while leaves
// its items to the others instead of making them wait for it at the end of the region.
template <typename Worker>
void for_each_item(int64_t count, const Worker& worker) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1,
                   [&](int64_t, int64_t) { worker([&next] { return next++; }); });
}

// What the scoring of a row needs of each partition q = (l, m), N entries per q at most: its layer's
// refined classes grouped by cluster (so that a cluster's sum is a short run of adds in a register,
// not a scatter into memory that the next load waits on), and each cluster's reciprocal size and
// size less one (b's and a's divisors: the scoring multiplies, within 1 ulp of sklearn's quotients,
// instead of dividing 2-3 times per cluster per row). Left uninitialised past what is used.
struct ClusterTables {
  explicit ClusterTables(int64_t entries)
      : class_end(new int32_t[entries]), classes(new int32_t[entries]), inv_size(new double[entries]),
        inv_rest(new double[entries]) {}
  std::unique_ptr<int32_t[]> class_end;  // [L, M, N]: cluster c's classes end at q's classes[class_end[c]]
  std::unique_ptr<int32_t[]> classes;    // [L, M, N]: the layer's classes ordered by their cluster in q
  std::unique_ptr<double[]> inv_size, inv_rest;  // [L, M, N]: 1 / size, 1 / max(size - 1, 1) of cluster c
};

inline void fill_cluster_tables(const Partitions& p, const Refinement& f, int64_t l, int64_t n_parts, int64_t n,
                                ClusterTables& t) {
  const int64_t n_classes = f.n_classes[l];
  for (int64_t q = l * n_parts; q < (l + 1) * n_parts; ++q) {
    const int64_t k = p.n_labels[q];
    const int64_t* start = p.start.data() + q * (n + 1);
    const int32_t* cluster_of = f.cluster.data() + q * n;
    int32_t* end = t.class_end.get() + q * n;
    std::fill(end, end + k, 0);
    for (int64_t r = 0; r < n_classes; ++r) ++end[cluster_of[r]];  // counting sort of the classes by cluster
    for (int64_t c = 1; c < k; ++c) end[c] += end[c - 1];
    for (int64_t r = n_classes - 1; r >= 0; --r) t.classes[q * n + --end[cluster_of[r]]] = static_cast<int32_t>(r);
    for (int64_t c = 0; c < k; ++c) {  // end[c] is now the start of cluster c: shift to the ends
      end[c] = static_cast<int32_t>(c + 1 < k ? end[c + 1] : n_classes);
      const int64_t size = start[c + 1] - start[c];
      t.inv_size[q * n + c] = 1.0 / static_cast<double>(size);
      t.inv_rest[q * n + c] = 1.0 / static_cast<double>(std::max<int64_t>(size - 1, 1));
    }
  }
}

// The labels renumbered and refined (silhouette_partitions.h), and the cluster tables: on one
// thread, ~0.3 ms at the benchmark's size (perf, one thread: ~5% of the op). Spread over the layers
// in a parallel region of its own it measured no faster on two cores within the noise (+-10%), and
// each region's end waits for every thread, a scheduler tick when the machine is busy.
struct Prepared {
  Partitions p;
  Refinement f;
  ClusterTables t;
};

inline Prepared prepare(const at::Tensor& labels, int64_t n) {
  const int64_t n_layers = labels.size(0), n_parts = labels.size(1);
  Prepared prep{compact_partitions(labels, n), Refinement{}, ClusterTables(n_layers * n_parts * n)};
  prep.f = refine_partitions(prep.p, n_layers, n_parts, n);
  for (int64_t l = 0; l < n_layers; ++l) fill_cluster_tables(prep.p, prep.f, l, n_parts, n, prep.t);
  return prep;
}

// The silhouette of every client under every partition of every layer, summed over each block of
// kRowsPerItem clients in client order (block_total [L, M, blocks]); false if d breaks its contract
// (or a row sum overflows), and the caller then finds and reports the entry. The work items are the
// blocks of rows of every layer, in one parallel region. A block's rows are summed per class first,
// then scored partition by partition (independent rows back to back, which the CPU overlaps). Each
// block's totals are computed the same way whichever thread takes it.
template <typename scalar_t>
bool silhouette_rows(const scalar_t* d, const Prepared& prep, int64_t n_layers, int64_t n_parts, int64_t n,
                     double* block_total) {
  const Partitions& p = prep.p;
  const Refinement& f = prep.f;
  const ClusterTables& t = prep.t;
  const int64_t blocks = (n + kRowsPerItem - 1) / kRowsPerItem, items = n_layers * blocks;
  const double diag_tol = diagonal_tolerance<scalar_t>();
  std::atomic<bool> valid{true};
  for_each_item(items, [&](auto take) {
    std::vector<double> block_sums(kRowsPerItem * n);  // the block's class sums, row after row
    for (int64_t item = take(); item < items && valid; item = take()) {
      const int64_t l = item / blocks, i0 = (item % blocks) * kRowsPerItem, i1 = std::min(n, i0 + kRowsPerItem);
      const int64_t n_classes = f.n_classes[l];
      const int32_t* members = f.members.data() + l * n;
      const int64_t* class_start = f.start.data() + l * (n + 1);
      const int32_t* class_of = f.class_of.data() + l * n;
      const bool masked = use_masked_sums<scalar_t>(n_classes);
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = d + (l * n + i) * n;
        double* csum = block_sums.data() + (i - i0) * n_classes;
        bool ok;
        if (masked)
          ok = masked_class_sums(reinterpret_cast<const float*>(row), class_of, n, n_classes, csum) ||
               row_in_contract(row, n);  // the exact check, when the fast one saw a -0 (or a bad entry)
        else if ((ok = row_in_contract(row, n)))
          class_sums(row, members, class_start, n_classes, csum);
        double total = 0.0;
        for (int64_t r = 0; r < n_classes; ++r) total += csum[r];
        if (ok && masked && !std::isfinite(total)) {  // a float lane overflowed (entries near FLT_MAX): in double
          class_sums(row, members, class_start, n_classes, csum);
          total = 0.0;
          for (int64_t r = 0; r < n_classes; ++r) total += csum[r];
        }
        if (!ok || !(static_cast<double>(row[i]) <= diag_tol) || !std::isfinite(total)) {
          valid = false;
          break;  // the scores are not used: the caller raises
        }
      }
      if (!valid) break;
      for (int64_t q = l * n_parts; q < (l + 1) * n_parts; ++q) {
        const int64_t k = p.n_labels[q];
        if (!silhouette_defined(k, n)) continue;
        const int64_t* start = p.start.data() + q * (n + 1);
        const int32_t* class_end = t.class_end.get() + q * n;
        const int32_t* classes = t.classes.get() + q * n;
        const double* inv_size = t.inv_size.get() + q * n;
        const double* inv_rest = t.inv_rest.get() + q * n;
        double block = 0.0;
        for (int64_t i = i0; i < i1; ++i) {
          const double* csum = block_sums.data() + (i - i0) * n_classes;
          const int32_t own = p.label[q * n + i];
          double a = 0.0, b = std::numeric_limits<double>::infinity();
          for (int64_t c = 0, r = 0; c < k; ++c) {
            double sum = 0.0;
            for (; r < class_end[c]; ++r) sum += csum[classes[r]];
            a = c == own ? sum * inv_rest[c] : a;
            b = c == own ? b : std::min(b, sum * inv_size[c]);
          }
          block += silhouette_from_means(a, b, start[own + 1] - start[own]);
        }
        block_total[q * blocks + item % blocks] = block;
      }
    }
  });
  return valid;
}

// Called only after the pass found d outside its contract: the first offending entry, in [l, i, j]
// order, for the message.
template <typename scalar_t>
void report_violation(const scalar_t* d, int64_t n_layers, int64_t n) {
  const double diag_tol = diagonal_tolerance<scalar_t>();
  for (int64_t l = 0; l < n_layers; ++l)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(d[(l * n + i) * n + j]);
        TORCH_CHECK_VALUE(std::isfinite(v), "silhouette: d has a NaN or Inf entry at layer ", l, ", [", i, ", ", j, "]");
        TORCH_CHECK_VALUE(v >= 0, "silhouette: d has a negative distance at layer ", l, ", [", i, ", ", j, "]: ", v);
        TORCH_CHECK_VALUE(i != j || v <= diag_tol, "silhouette: d must have a zero diagonal (within 100 eps of its dtype, ",
                          diag_tol, ", as sklearn): layer ", l, ", d[", i, ", ", i, "] = ", v);
      }
  TORCH_CHECK_VALUE(false, "silhouette: the row sums of d overflow float64; scale d down");
}

at::Tensor silhouette_cpu(const at::Tensor& d, const at::Tensor& labels) {
  NvtxRange range("fedtreelora::silhouette");
  TORCH_CHECK_VALUE(d.device().is_cpu() && labels.device().is_cpu(), "silhouette: d and labels must be CPU tensors");
  check_silhouette_args(d, labels);
  const int64_t n_layers = d.size(0), n_parts = labels.size(1), n = d.size(1);
  const at::Tensor dc = d.contiguous();
  const Prepared prep = prepare(labels.contiguous(), n);
  const int64_t blocks = (n + kRowsPerItem - 1) / kRowsPerItem;
  std::vector<double> block_total(n_layers * n_parts * blocks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dc.scalar_type(), "silhouette_cpu", [&] {
    if (!silhouette_rows(dc.data_ptr<scalar_t>(), prep, n_layers, n_parts, n, block_total.data()))
      report_violation(dc.data_ptr<scalar_t>(), n_layers, n);
  });
  at::Tensor out = at::empty({n_layers, n_parts}, d.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t q = 0; q < n_layers * n_parts; ++q) {
    if (!silhouette_defined(prep.p.n_labels[q], n)) {
      o[q] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    double total = 0.0;  // the blocks' totals in client order: the result does not depend on the thread count
    for (int64_t b = 0; b < blocks; ++b) total += block_total[q * blocks + b];
    o[q] = static_cast<float>(total / static_cast<double>(n));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedtreelora, CPU, m) { m.impl("silhouette", &silhouette_cpu); }

}  // namespace fedtreelora
