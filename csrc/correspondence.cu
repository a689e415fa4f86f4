// CUDA kernel of `correspondence`: the overlap metric between every region of view 1 and every
// region of view 2, one thread per output element.
//
// The result is bit-identical to reference/correspondence.py computed on the CPU: each value is
// computed in the accumulation type (fp32, fp64 for fp64 boxes) with the reference's operations
// in the reference's order, and every operation goes through a round-to-nearest intrinsic
// (__fmul_rn, __fdiv_rn, ...) so that nvcc can neither contract a multiply-add into an FMA nor
// replace a division by an approximate one, whatever flags the extension is built with.
// (The torch reference run on CUDA tensors is not the spec here: its `tensor / n` multiplies by
// a rounded reciprocal and may differ from a true division in the last bit.)
#include "native.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace mgc {
namespace {

constexpr int kThreads = 256;

// One rounding per operation, in float or double.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// Edge k of n equal cells from lo to hi: (lo * (n - k) + hi * k) / n (reference/region_boxes.py).
template <typename acc_t>
__device__ __forceinline__ acc_t cell_edge(acc_t lo, acc_t hi, int k, int n) {
  const acc_t numerator = add_rn(mul_rn(lo, static_cast<acc_t>(n - k)),
                                 mul_rn(hi, static_cast<acc_t>(k)));
  return div_rn(numerator, static_cast<acc_t>(n));
}

template <typename acc_t>
struct Box {
  acc_t x0, y0, x1, y1;
};

// The box of token-order region `region` (row-major, flip-aware) of one view's crop `crop`.
template <typename acc_t>
__device__ __forceinline__ Box<acc_t> region_box(const Box<acc_t>& crop, bool flipped,
                                                 int region, int n) {
  const int row = region / n;
  const int token_col = region % n;
  const int col = flipped ? n - 1 - token_col : token_col;  // the crop column a token shows
  return {cell_edge(crop.x0, crop.x1, col, n), cell_edge(crop.y0, crop.y1, row, n),
          cell_edge(crop.x0, crop.x1, col + 1, n), cell_edge(crop.y0, crop.y1, row + 1, n)};
}

// max(min(a1, b1) - max(a0, b0), 0): the overlap of two intervals (the reference's w and h).
template <typename acc_t>
__device__ __forceinline__ acc_t overlap(acc_t a0, acc_t a1, acc_t b0, acc_t b1) {
  const acc_t len = sub_rn(a1 < b1 ? a1 : b1, a0 > b0 ? a0 : b0);
  return len > acc_t(0) ? len : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t area(const Box<acc_t>& b) {
  return mul_rn(sub_rn(b.x1, b.x0), sub_rn(b.y1, b.y0));
}

enum MetricId : int { kMgc = 0, kIou = 1, kIoa = 2 };

// reference/correspondence.py::box_metric for one pair of boxes.
template <typename acc_t>
__device__ __forceinline__ acc_t box_metric(const Box<acc_t>& a, const Box<acc_t>& b,
                                            int metric) {
  const acc_t inter = mul_rn(overlap(a.x0, a.x1, b.x0, b.x1), overlap(a.y0, a.y1, b.y0, b.y1));
  const acc_t area_a = area(a);
  if (metric == kIoa) return div_rn(inter, area_a);
  const acc_t areas = add_rn(area_a, area(b));
  return div_rn(inter, metric == kIou ? sub_rn(areas, inter) : areas);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Box<acc_t> load_crop(const scalar_t* boxes, int64_t image) {
  const scalar_t* b = boxes + image * 4;
  return {static_cast<acc_t>(b[0]), static_cast<acc_t>(b[1]), static_cast<acc_t>(b[2]),
          static_cast<acc_t>(b[3])};
}

// out[image, r1, r2] for every image and region pair; int64 indices (B * n^4 may pass 2**31).
template <typename scalar_t, typename acc_t>
__global__ void correspondence_kernel(const scalar_t* __restrict__ boxes1,
                                      const bool* __restrict__ flips1,
                                      const scalar_t* __restrict__ boxes2,
                                      const bool* __restrict__ flips2,
                                      scalar_t* __restrict__ out, int64_t total, int n,
                                      int metric) {
  const int64_t regions = static_cast<int64_t>(n) * n;
  const int64_t pairs = regions * regions;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t image = item / pairs;
    const int64_t pair = item - image * pairs;
    const int r1 = static_cast<int>(pair / regions);
    const int r2 = static_cast<int>(pair - r1 * regions);
    const Box<acc_t> a = region_box(load_crop<scalar_t, acc_t>(boxes1, image), flips1[image], r1, n);
    const Box<acc_t> b = region_box(load_crop<scalar_t, acc_t>(boxes2, image), flips2[image], r2, n);
    out[item] = static_cast<scalar_t>(box_metric(a, b, metric));
  }
}

int metric_id(const std::string& metric) {
  if (metric == "mgc") return kMgc;
  if (metric == "iou") return kIou;
  TORCH_CHECK(metric == "ioa", "mgc_kernels native: unknown metric '", metric, "'");
  return kIoa;
}

void check_view_cuda(const torch::Tensor& boxes, const torch::Tensor& flips,
                     const torch::Tensor& like) {
  TORCH_CHECK(boxes.is_cuda() && flips.is_cuda() && boxes.device() == like.device(),
              "mgc_kernels native: expected CUDA tensors on one device");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.size(0) == like.size(0),
              "mgc_kernels native: boxes must be [B, 4] with one B");
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "mgc_kernels native: boxes must be float");
  TORCH_CHECK(flips.numel() == boxes.size(0), "mgc_kernels native: flips must be [B]");
}

}  // namespace

torch::Tensor correspondence_cuda(const torch::Tensor& boxes1, const torch::Tensor& flips1,
                                  const torch::Tensor& boxes2, const torch::Tensor& flips2,
                                  int64_t n, const std::string& metric) {
  check_view_cuda(boxes1, flips1, boxes1);
  check_view_cuda(boxes2, flips2, boxes1);
  TORCH_CHECK(n >= 1 && n <= 46340 / n, "mgc_kernels native: n*n regions must fit in int32");
  const int metric_code = metric_id(metric);
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.to(boxes1.scalar_type()).contiguous();
  const auto f1 = flips1.to(at::kBool).contiguous();
  const auto f2 = flips2.to(at::kBool).contiguous();
  const int64_t batch = b1.size(0);
  auto out = torch::empty({batch, n * n, n * n}, b1.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, b1.scalar_type(), "correspondence_cuda",
      [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        correspondence_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            b1.data_ptr<scalar_t>(), f1.data_ptr<bool>(), b2.data_ptr<scalar_t>(),
            f2.data_ptr<bool>(), out.data_ptr<scalar_t>(), total, static_cast<int>(n),
            metric_code);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace mgc
