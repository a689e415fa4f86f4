// CUDA implementation of `sample_pairs`: the best k region pairs of two views, equal to
// reference/sample_pairs.py (computed on the CPU) index for index and bit for bit.
//
// 1. `score_kernel`, one thread per candidate (image, view-1 region, view-2 region) in the
//    released visiting order (view-1 unflipped row-major region, then view-2 unflipped region):
//    the `mgc` weight |a & b| / (|a| + |b|) in fp32 (fp64 for fp64 boxes) with the reference's
//    operations and one rounding per operation (round-to-nearest intrinsics: no FMA), rounded
//    through the boxes' dtype as the reference does; 0 where it is not positive or, for method
//    "mgc", where the released stride rule does not visit the view-1 region.
// 2. Selection, best first with ties in visiting order (the reference's stable descending sort):
//    for fp32 scores each candidate is one int64 key (weight bits << 32 | ~visit), unique, so
//    `topk` of the keys is exact and needs no sort of the whole row; fp64 scores use a stable
//    sort of the row.
// 3. `decode_kernel` maps the selected visits back to token indices (flips) and pads with
//    (0, 0, 0).
#include "geometry.cuh"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

namespace mgc {

using namespace cuda_geometry;

namespace {

constexpr int64_t kVisitMask = 0xFFFFFFFFLL;  // low half of a packed key: ~visit
constexpr int64_t kPositive = int64_t(1) << 32;  // keys of positive weights are at least this

// ----------------------------------------------------------------- the released stride rule --

// The stride rule of one axis, (ratio, min, max), and the view geometry, as the host passes them.
struct Rule {
  float ratio;
  int64_t lo, hi;
};

struct ViewGeometry {
  float view_size32;  // the view size as the released code's float32 tensors hold it
  double view_size;
  double cell;  // view_size / n in double, as Python computes it
};

struct Span {
  int64_t first, last;
};

// reference.sample_pairs.overlap_span: the first and last view-1 cell (unflipped) that the crops'
// overlap touches along one axis; differences in the boxes' dtype, ratios in float32, the cell
// arithmetic in double.
template <typename scalar_t>
__device__ __forceinline__ Span overlap_span(scalar_t lo1, scalar_t hi1, scalar_t lo2,
                                             scalar_t hi2, const ViewGeometry& view) {
  const float size1 = static_cast<float>(sub_rn(hi1, lo1));
  const scalar_t o_lo = max_of(lo1, lo2);
  const scalar_t o_hi = min_of(hi1, hi2);
  const float start = mul_rn(div_rn(static_cast<float>(sub_rn(o_lo, lo1)), size1),
                             view.view_size32);
  const float end = add_rn(start, mul_rn(div_rn(static_cast<float>(sub_rn(o_hi, o_lo)), size1),
                                         view.view_size32));
  const double first = floor(div_rn(static_cast<double>(start), view.cell));
  const double last = floor(div_rn(static_cast<double>(end), view.cell));
  const bool on_edge = mul_rn(last, view.cell) == static_cast<double>(end) ||
                       static_cast<double>(end) > view.view_size;
  return {static_cast<int64_t>(first), static_cast<int64_t>(last - (on_edge ? 1.0 : 0.0))};
}

// reference.sample_pairs.crop_iou32: exact (fp64) areas, one float32 division.
__device__ __forceinline__ float crop_iou32(const Box<double>& a, const Box<double>& b) {
  const double inter = mul_rn(overlap(a.x0, a.x1, b.x0, b.x1), overlap(a.y0, a.y1, b.y0, b.y1));
  const double union_ = sub_rn(add_rn(area(a), area(b)), inter);
  return div_rn(static_cast<float>(inter), static_cast<float>(union_));
}

__device__ __forceinline__ int64_t stride_of(float iou32, const Rule& rule) {
  const int64_t step = static_cast<int64_t>(floorf(mul_rn(iou32, rule.ratio)));
  return min_of(max_of(step, rule.lo), rule.hi);
}

__device__ __forceinline__ bool on_stride(int64_t i, const Span& span, int64_t step) {
  return i >= span.first && i <= span.last && (i - span.first) % step == 0;
}

// Whether the released rule visits unflipped view-1 cell (row, col) of this image.
template <typename scalar_t>
__device__ __forceinline__ bool mgc_visits(const scalar_t* boxes1, const scalar_t* boxes2,
                                           int64_t image, int row, int col,
                                           const ViewGeometry& view, const Rule& row_rule,
                                           const Rule& col_rule) {
  const Box<scalar_t> a = load_box<scalar_t>(boxes1, image);
  const Box<scalar_t> b = load_box<scalar_t>(boxes2, image);
  const Span rows = overlap_span(a.y0, a.y1, b.y0, b.y1, view);
  const Span cols = overlap_span(a.x0, a.x1, b.x0, b.x1, view);
  const float iou = crop_iou32(load_box<double>(boxes1, image), load_box<double>(boxes2, image));
  return on_stride(row, rows, stride_of(iou, row_rule)) &&
         on_stride(col, cols, stride_of(iou, col_rule));
}

// ------------------------------------------------------------------------------- kernels --

// One candidate per thread: scores (fp64) or packed keys (fp32), [B, regions^2] in visiting order.
template <typename scalar_t, typename acc_t>
__global__ void score_kernel(const scalar_t* __restrict__ boxes1,
                             const scalar_t* __restrict__ boxes2, int64_t total, int n,
                             bool mgc_rule, ViewGeometry view, Rule row_rule, Rule col_rule,
                             int64_t* __restrict__ keys, acc_t* __restrict__ scores) {
  const int64_t regions = static_cast<int64_t>(n) * n;
  const int64_t candidates = regions * regions;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t image = item / candidates;
    const int64_t visit = item - image * candidates;
    const int u1 = static_cast<int>(visit / regions);
    const int u2 = static_cast<int>(visit - u1 * regions);
    const int row1 = u1 / n, col1 = u1 % n, row2 = u2 / n, col2 = u2 % n;
    acc_t w = box_metric(cell_box(load_box<acc_t>(boxes1, image), row1, col1, n),
                         cell_box(load_box<acc_t>(boxes2, image), row2, col2, n),
                         geometry::Metric::mgc);
    // the reference scores correspondence(...) in the boxes' dtype, then in acc_t
    w = static_cast<acc_t>(static_cast<scalar_t>(w));
    const bool visited = !mgc_rule || mgc_visits(boxes1, boxes2, image, row1, col1, view,
                                                 row_rule, col_rule);
    const acc_t score = (visited && w > acc_t(0)) ? w : acc_t(0);
    if constexpr (std::is_same<acc_t, float>::value) {
      // non-negative floats order like their bits; a smaller visit wins a tie
      keys[item] = (static_cast<int64_t>(__float_as_uint(score)) << 32) | (kVisitMask - visit);
    } else {
      scores[item] = score;
    }
  }
}

// Token index of unflipped region u (row-major over n x n) of a view.
__device__ __forceinline__ int64_t token_of(int64_t u, int n, bool flipped) {
  const int64_t row = u / n, col = u % n;
  return row * n + (flipped ? n - 1 - col : col);
}

// (idx1, idx2, weight) [B, k] from the k_kept selected candidates of each image (top_keys for
// fp32, or top_scores + top_visits with row stride `stride` for fp64); ranks >= k_kept are pads.
template <typename scalar_t, typename acc_t>
__global__ void decode_kernel(const int64_t* __restrict__ top_keys,
                              const acc_t* __restrict__ top_scores,
                              const int64_t* __restrict__ top_visits, int64_t stride,
                              const bool* __restrict__ flips1, const bool* __restrict__ flips2,
                              int64_t total, int64_t k, int64_t k_kept, int n,
                              int64_t* __restrict__ idx1, int64_t* __restrict__ idx2,
                              scalar_t* __restrict__ weight) {
  const int64_t regions = static_cast<int64_t>(n) * n;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t image = item / k;
    const int64_t rank = item - image * k;
    acc_t w = acc_t(0);
    int64_t visit = 0;
    if (rank < k_kept) {
      if constexpr (std::is_same<acc_t, float>::value) {
        const int64_t key = top_keys[image * stride + rank];
        w = key >= kPositive ? __uint_as_float(static_cast<unsigned>(key >> 32)) : 0.0f;
        visit = kVisitMask - (key & kVisitMask);
      } else {
        w = top_scores[image * stride + rank];
        visit = top_visits[image * stride + rank];
      }
    }
    const bool kept = w > acc_t(0);
    idx1[item] = kept ? token_of(visit / regions, n, flips1[image]) : 0;
    idx2[item] = kept ? token_of(visit % regions, n, flips2[image]) : 0;
    weight[item] = static_cast<scalar_t>(kept ? w : acc_t(0));
  }
}

// ---------------------------------------------------------------------------------- host --

Rule make_rule(const std::vector<double>& rule, const char* name) {
  TORCH_CHECK(rule.size() == 3, "mgc_kernels native: ", name, " must be (ratio, min, max)");
  TORCH_CHECK(rule[1] >= 1 && rule[1] <= rule[2],
              "mgc_kernels native: ", name, " needs 1 <= min <= max");
  return {static_cast<float>(rule[0]), static_cast<int64_t>(rule[1]),
          static_cast<int64_t>(rule[2])};
}

// The selected candidates of each image: [B, k_kept] keys (fp32), or (scores, visits) rows of a
// full stable sort (fp64) of which the first k_kept columns count.
struct Selection {
  torch::Tensor keys, scores, visits;
  int64_t stride;
};

Selection select_candidates(const torch::Tensor& candidates, int64_t k_kept) {
  if (candidates.scalar_type() == at::kLong) {
    // unique keys: topk is exact and its sorted output is the stable descending order
    auto keys = std::get<0>(at::topk(candidates, k_kept, /*dim=*/1, /*largest=*/true,
                                     /*sorted=*/true)).contiguous();
    return {keys, torch::Tensor(), torch::Tensor(), k_kept};
  }
  auto sorted = at::sort(candidates, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  return {torch::Tensor(), std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous(),
          candidates.size(1)};
}

// Method "all": the largest number of positive candidates of an image (a host sync, as in the
// reference).
int64_t most_positive(const torch::Tensor& candidates) {
  if (candidates.size(0) == 0) return 0;
  const auto positive = candidates.scalar_type() == at::kLong ? candidates.ge(kPositive)
                                                              : candidates.gt(0);
  return positive.sum(1).max().item<int64_t>();
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sample_pairs_cuda(
    const torch::Tensor& boxes1, const torch::Tensor& flips1, const torch::Tensor& boxes2,
    const torch::Tensor& flips2, int64_t n, int64_t k, const std::string& method,
    double view_size, const std::vector<double>& row_rule, const std::vector<double>& col_rule) {
  check_views_cuda(boxes1, flips1, boxes2, flips2);
  TORCH_CHECK(method == "mgc" || method == "topk" || method == "all",
              "mgc_kernels native: unknown method '", method, "'");
  // visits are packed into 32 bits
  TORCH_CHECK(n >= 1 && n <= 215, "mgc_kernels native: CUDA sample_pairs needs grid/cell <= 215");
  TORCH_CHECK(method == "all" || k >= 1, "mgc_kernels native: k must be positive");
  const Rule rows = make_rule(row_rule, "row_rule");
  const Rule cols = make_rule(col_rule, "col_rule");
  const ViewGeometry view{static_cast<float>(view_size), view_size,
                          view_size / static_cast<double>(n)};

  const c10::cuda::CUDAGuard guard(boxes1.device());
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.to(boxes1.scalar_type()).contiguous();
  const auto f1 = flips1.to(at::kBool).contiguous();
  const auto f2 = flips2.to(at::kBool).contiguous();
  const int64_t batch = b1.size(0);
  const int64_t regions = n * n;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool fp64 = b1.scalar_type() == at::kDouble;
  auto candidates = torch::empty({batch, regions * regions},
                                 b1.options().dtype(fp64 ? at::kDouble : at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, b1.scalar_type(), "sample_pairs_score",
      [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const int64_t total = candidates.numel();
        if (total == 0) return;
        score_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), total, static_cast<int>(n),
            method == "mgc", view, rows, cols,
            fp64 ? nullptr : candidates.data_ptr<int64_t>(),
            fp64 ? reinterpret_cast<acc_t*>(candidates.data_ptr<double>()) : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });

  if (method == "all") k = most_positive(candidates);
  const int64_t k_kept = std::min(k, regions * regions);
  auto idx1 = torch::empty({batch, k}, b1.options().dtype(at::kLong));
  auto idx2 = torch::empty_like(idx1);
  auto weight = torch::empty({batch, k}, b1.options());
  const int64_t total = idx1.numel();
  if (total == 0) return {idx1, idx2, weight};
  const Selection top = k_kept > 0 ? select_candidates(candidates, k_kept)
                                   : Selection{torch::Tensor(), torch::Tensor(),
                                               torch::Tensor(), 0};

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, b1.scalar_type(), "sample_pairs_decode",
      [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const int64_t* keys = top.keys.defined() ? top.keys.data_ptr<int64_t>() : nullptr;
        const acc_t* scores =
            top.scores.defined() ? reinterpret_cast<const acc_t*>(top.scores.data_ptr()) : nullptr;
        const int64_t* visits = top.visits.defined() ? top.visits.data_ptr<int64_t>() : nullptr;
        decode_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            keys, scores, visits, top.stride, f1.data_ptr<bool>(), f2.data_ptr<bool>(), total,
            k, k_kept, static_cast<int>(n), idx1.data_ptr<int64_t>(), idx2.data_ptr<int64_t>(),
            weight.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {idx1, idx2, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mgc_kernels_native, CUDA, m) {
  m.impl("sample_pairs", &sample_pairs_cuda);
}

}  // namespace mgc
