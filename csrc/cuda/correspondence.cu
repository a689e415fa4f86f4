// CUDA kernel of `correspondence`: the overlap metric between every region of view 1 and every
// region of view 2, one thread per output element.
//
// The result is bit-identical to reference/correspondence.py computed on the CPU: each value is
// computed in the accumulation type (fp32, fp64 for fp64 boxes) with geometry.cuh's
// correctly-rounded operations in the reference's order. (The torch reference run on CUDA
// tensors is not the spec here: its `tensor / n` multiplies by a rounded reciprocal and may differ
// from a true division in the last bit.)
#include "geometry.cuh"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace mgc {

using namespace cuda_geometry;

namespace {

// The box of token-order region `region` (row-major, flip-aware) of one view's crop `crop`.
template <typename acc_t>
__device__ __forceinline__ Box<acc_t> region_box(const Box<acc_t>& crop, bool flipped,
                                                 int region, int n) {
  const int token_col = region % n;
  return cell_box(crop, region / n, flipped ? n - 1 - token_col : token_col, n);
}

// out[image, r1, r2] for every image and region pair; int64 indices (B * n^4 may pass 2**31).
template <typename scalar_t, typename acc_t>
__global__ void correspondence_kernel(const scalar_t* __restrict__ boxes1,
                                      const bool* __restrict__ flips1,
                                      const scalar_t* __restrict__ boxes2,
                                      const bool* __restrict__ flips2,
                                      scalar_t* __restrict__ out, int64_t total, int n,
                                      geometry::Metric metric) {
  const int64_t regions = static_cast<int64_t>(n) * n;
  const int64_t pairs = regions * regions;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t image = item / pairs;
    const int64_t pair = item - image * pairs;
    const int r1 = static_cast<int>(pair / regions);
    const int r2 = static_cast<int>(pair - r1 * regions);
    const Box<acc_t> a = region_box(load_box<acc_t>(boxes1, image), flips1[image], r1, n);
    const Box<acc_t> b = region_box(load_box<acc_t>(boxes2, image), flips2[image], r2, n);
    out[item] = static_cast<scalar_t>(box_metric(a, b, metric));
  }
}

torch::Tensor correspondence_cuda(const torch::Tensor& boxes1, const torch::Tensor& flips1,
                                  const torch::Tensor& boxes2, const torch::Tensor& flips2,
                                  int64_t n, const std::string& metric) {
  check_views_cuda(boxes1, flips1, boxes2, flips2);
  // int32 region-pair indices within an image: n^4 <= 2^31
  TORCH_CHECK(n >= 1 && n <= 215, "mgc_kernels native: CUDA correspondence needs grid/cell <= 215");
  const geometry::Metric metric_code = geometry::parse_metric(metric);
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.to(boxes1.scalar_type()).contiguous();
  const auto f1 = flips1.to(at::kBool).contiguous();
  const auto f2 = flips2.to(at::kBool).contiguous();
  const int64_t batch = b1.size(0);
  auto out = torch::empty({batch, n * n, n * n}, b1.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, b1.scalar_type(), "correspondence_cuda",
      [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        correspondence_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            b1.data_ptr<scalar_t>(), f1.data_ptr<bool>(), b2.data_ptr<scalar_t>(),
            f2.data_ptr<bool>(), out.data_ptr<scalar_t>(), total, static_cast<int>(n),
            metric_code);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgc_kernels_native, CUDA, m) {
  m.impl("correspondence", &correspondence_cuda);
}

}  // namespace mgc
