// Device geometry shared by correspondence.cu and sample_pairs.cu: region boxes and their overlap
// metrics with the reference's operations in the reference's order (reference/region_boxes.py,
// reference/correspondence.py).
//
// Every float operation goes through a round-to-nearest intrinsic (__fmul_rn, __fdiv_rn, ...), so
// nvcc can neither contract a multiply-add into an FMA nor replace a division by an approximate
// one, whatever flags the extension is built with: the results are the CPU reference's bits.
#pragma once

#include "native.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace mgc {
namespace cuda_geometry {

constexpr int kThreads = 256;

// Blocks of kThreads for a grid-stride loop over `total` items.
inline int64_t blocks_for(int64_t total) {
  return std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);
}

// One rounding per operation, in float or double.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
// fp16/bf16: c10's operators compute in float and round to the 16-bit type, as torch does.
template <typename T>
__device__ __forceinline__ T sub_rn(T a, T b) { return a - b; }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// fp16/bf16 compare as float (c10's types convert to both float and __half on the device).
template <typename T>
using compare_t = std::conditional_t<
    std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value, float, T>;
template <typename T>
__device__ __forceinline__ T max_of(T a, T b) {
  return static_cast<compare_t<T>>(a) > static_cast<compare_t<T>>(b) ? a : b;
}
template <typename T>
__device__ __forceinline__ T min_of(T a, T b) {
  return static_cast<compare_t<T>>(a) < static_cast<compare_t<T>>(b) ? a : b;
}

// Edge k of n equal cells from lo to hi: (lo * (n - k) + hi * k) / n.
template <typename acc_t>
__device__ __forceinline__ acc_t cell_edge(acc_t lo, acc_t hi, int k, int n) {
  const acc_t numerator = add_rn(mul_rn(lo, static_cast<acc_t>(n - k)),
                                 mul_rn(hi, static_cast<acc_t>(k)));
  return div_rn(numerator, static_cast<acc_t>(n));
}

template <typename T>
struct Box {
  T x0, y0, x1, y1;
};

// Box `image` of [B, 4] boxes, converted to T.
template <typename T, typename scalar_t>
__device__ __forceinline__ Box<T> load_box(const scalar_t* boxes, int64_t image) {
  const scalar_t* b = boxes + image * 4;
  return {static_cast<T>(b[0]), static_cast<T>(b[1]), static_cast<T>(b[2]),
          static_cast<T>(b[3])};
}

// The cell (row, col) of a crop split into n x n cells, in crop (unflipped) columns.
template <typename acc_t>
__device__ __forceinline__ Box<acc_t> cell_box(const Box<acc_t>& crop, int row, int col, int n) {
  return {cell_edge(crop.x0, crop.x1, col, n), cell_edge(crop.y0, crop.y1, row, n),
          cell_edge(crop.x0, crop.x1, col + 1, n), cell_edge(crop.y0, crop.y1, row + 1, n)};
}

// max(min(a1, b1) - max(a0, b0), 0): the overlap of two intervals (the reference's w and h).
template <typename T>
__device__ __forceinline__ T overlap(T a0, T a1, T b0, T b1) {
  const T len = sub_rn(min_of(a1, b1), max_of(a0, b0));
  return len > T(0) ? len : T(0);
}

template <typename T>
__device__ __forceinline__ T area(const Box<T>& b) {
  return mul_rn(sub_rn(b.x1, b.x0), sub_rn(b.y1, b.y0));
}

// reference/correspondence.py's box_metric for one pair of boxes.
template <typename acc_t>
__device__ __forceinline__ acc_t box_metric(const Box<acc_t>& a, const Box<acc_t>& b,
                                            geometry::Metric metric) {
  const acc_t inter = mul_rn(overlap(a.x0, a.x1, b.x0, b.x1), overlap(a.y0, a.y1, b.y0, b.y1));
  const acc_t area_a = area(a);
  if (metric == geometry::Metric::ioa) return div_rn(inter, area_a);
  const acc_t areas = add_rn(area_a, area(b));
  return div_rn(inter, metric == geometry::Metric::iou ? sub_rn(areas, inter) : areas);
}

// Checks shared by the geometry ops: [B, 4] float boxes and [B] flips of two views of the same
// B images, all on one CUDA device.
inline void check_views_cuda(const torch::Tensor& boxes1, const torch::Tensor& flips1,
                             const torch::Tensor& boxes2, const torch::Tensor& flips2) {
  const auto device = boxes1.device();
  TORCH_CHECK(boxes1.is_cuda() && flips1.device() == device && boxes2.device() == device &&
                  flips2.device() == device,
              "mgc_kernels native: expected CUDA tensors on one device");
  TORCH_CHECK(boxes1.dim() == 2 && boxes1.size(1) == 4 && boxes2.sizes() == boxes1.sizes() &&
                  flips1.numel() == boxes1.size(0) && flips2.numel() == boxes1.size(0),
              "mgc_kernels native: expected boxes [B, 4] and flips [B] for both views");
  TORCH_CHECK(at::isFloatingType(boxes1.scalar_type()) && at::isFloatingType(boxes2.scalar_type()),
              "mgc_kernels native: boxes must be float");
}

}  // namespace cuda_geometry
}  // namespace mgc
