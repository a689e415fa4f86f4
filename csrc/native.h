// What the kernel sources of the "native" backend share: torch's op registration (each source
// registers its kernels for the ops that bindings.cpp declares) and the small geometry helpers of
// the CPU sources. Every kernel computes exactly what the torch reference in
// mgc_kernels/reference/ computes; the Python op wrappers have already validated the user's input.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace mgc {

// Helpers shared by cpu/correspondence.cpp and cpu/sample_pairs.cpp. They repeat the reference's
// operations in the same order and type, so (built without FMA contraction) the results are the
// reference's bits.
namespace geometry {

// Cell edge k of n between lo and hi: (lo*(n-k) + hi*k)/n, as reference/region_boxes.py.
template <typename acc_t>
inline acc_t region_edge(acc_t lo, acc_t hi, int64_t n, int64_t k) {
  return (lo * static_cast<acc_t>(n - k) + hi * static_cast<acc_t>(k)) / static_cast<acc_t>(n);
}

// The n + 1 edges of one axis of a box, written to edges[0..n].
template <typename acc_t>
inline void region_edges(acc_t lo, acc_t hi, int64_t n, acc_t* edges) {
  for (int64_t k = 0; k <= n; ++k) edges[k] = region_edge(lo, hi, n, k);
}

// Length of the overlap of [a0, a1] and [b0, b1], clamped at 0 (the reference's w and h).
template <typename acc_t>
inline acc_t overlap(acc_t a0, acc_t a1, acc_t b0, acc_t b1) {
  const acc_t len = std::min(a1, b1) - std::max(a0, b0);
  return len > acc_t(0) ? len : acc_t(0);
}

enum class Metric { mgc, iou, ioa };

inline Metric parse_metric(const std::string& metric) {
  if (metric == "mgc") return Metric::mgc;
  if (metric == "iou") return Metric::iou;
  TORCH_CHECK(metric == "ioa", "mgc_kernels native: unknown metric '", metric, "'");
  return Metric::ioa;
}

// reference/correspondence.py's box_metric for one pair, given inter = w * h and both areas.
template <typename acc_t>
inline acc_t metric_value(Metric metric, acc_t inter, acc_t area_a, acc_t area_b) {
  switch (metric) {
    case Metric::mgc: return inter / (area_a + area_b);
    case Metric::iou: return inter / ((area_a + area_b) - inter);
    default: return inter / area_a;
  }
}

// The token column of unflipped crop column c (a flip is its own inverse).
inline int64_t token_column(bool flipped, int64_t n, int64_t c) {
  return flipped ? n - 1 - c : c;
}

// Checks shared by the geometry ops: [B, 4] contiguous float boxes, [B] bool flips, on CPU.
inline void check_view_cpu(const torch::Tensor& boxes, const torch::Tensor& flips) {
  TORCH_CHECK(boxes.device().is_cpu() && flips.device().is_cpu(),
              "mgc_kernels native: expected CPU tensors");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "mgc_kernels native: boxes must be [B, 4]");
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "mgc_kernels native: boxes must be float");
  TORCH_CHECK(flips.scalar_type() == at::kBool && flips.numel() == boxes.size(0),
              "mgc_kernels native: flips must be bool [B]");
}

}  // namespace geometry

// Threads for an OpenMP loop over `work` items: torch's intra-op setting (so
// torch.set_num_threads governs this extension too), never more than there is work.
inline int cpu_threads(int64_t work) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(work, 1));
  return static_cast<int>(threads);
}

}  // namespace mgc
