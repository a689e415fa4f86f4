// correspondence on CPU: the metric between every region of view 1 and every region of view 2,
// bit-identical to mgc_kernels/reference/correspondence.py. The overlap of two regions factors
// into a width (depends on the two token columns) and a height (on the two rows), so each image
// computes n*n widths and n*n heights once and then only multiplies and divides per pair.
#include "native.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace mgc {
namespace {

using geometry::Metric;

// Per-image tables, reused across the images a thread handles.
template <typename acc_t>
struct Tables {
  explicit Tables(int64_t n)
      : x1(n + 1), y1(n + 1), x2(n + 1), y2(n + 1), width(n * n), height(n * n), area1(n * n),
        area2(n * n) {}
  std::vector<acc_t> x1, y1, x2, y2;  // cell edges of each view, unflipped
  std::vector<acc_t> width;           // [c1 * n + c2]: overlap along x of token columns c1, c2
  std::vector<acc_t> height;          // [r1 * n + r2]: overlap along y of rows r1, r2
  std::vector<acc_t> area1, area2;    // [r * n + c]: region areas in token order
};

// Edges of one box (x0, y0, x1, y1) in the accumulation dtype.
template <typename scalar_t, typename acc_t>
void box_edges(const scalar_t* box, int64_t n, acc_t* xs, acc_t* ys) {
  geometry::region_edges(static_cast<acc_t>(box[0]), static_cast<acc_t>(box[2]), n, xs);
  geometry::region_edges(static_cast<acc_t>(box[1]), static_cast<acc_t>(box[3]), n, ys);
}

// Areas (x1 - x0) * (y1 - y0) of a view's regions in token order (flipped columns mirrored).
template <typename acc_t>
void region_areas(const std::vector<acc_t>& xs, const std::vector<acc_t>& ys, bool flipped,
                  int64_t n, std::vector<acc_t>& areas) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      const int64_t col = geometry::token_column(flipped, n, c);
      areas[r * n + c] = (xs[col + 1] - xs[col]) * (ys[r + 1] - ys[r]);
    }
  }
}

template <typename acc_t>
void fill_tables(Tables<acc_t>& t, bool flip1, bool flip2, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t col1 = geometry::token_column(flip1, n, i);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t col2 = geometry::token_column(flip2, n, j);
      t.width[i * n + j] =
          geometry::overlap(t.x1[col1], t.x1[col1 + 1], t.x2[col2], t.x2[col2 + 1]);
      t.height[i * n + j] = geometry::overlap(t.y1[i], t.y1[i + 1], t.y2[j], t.y2[j + 1]);
    }
  }
  region_areas(t.x1, t.y1, flip1, n, t.area1);
  region_areas(t.x2, t.y2, flip2, n, t.area2);
}

// Writes the [n*n, n*n] block of one image.
template <typename scalar_t, typename acc_t>
void image_correspondence(const Tables<acc_t>& t, Metric metric, int64_t n, scalar_t* out) {
  const int64_t regions = n * n;
  for (int64_t r1 = 0; r1 < n; ++r1) {
    for (int64_t c1 = 0; c1 < n; ++c1) {
      const acc_t area_a = t.area1[r1 * n + c1];
      scalar_t* row = out + (r1 * n + c1) * regions;
      for (int64_t r2 = 0; r2 < n; ++r2) {
        const acc_t h = t.height[r1 * n + r2];
        for (int64_t c2 = 0; c2 < n; ++c2) {
          const acc_t inter = t.width[c1 * n + c2] * h;
          const acc_t value = geometry::metric_value(metric, inter, area_a, t.area2[r2 * n + c2]);
          row[r2 * n + c2] = static_cast<scalar_t>(value);
        }
      }
    }
  }
}

template <typename scalar_t>
void correspondence_kernel(const torch::Tensor& boxes1, const torch::Tensor& flips1,
                           const torch::Tensor& boxes2, const torch::Tensor& flips2, int64_t n,
                           Metric metric, torch::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = boxes1.size(0), regions = n * n;
  const scalar_t* b1 = boxes1.data_ptr<scalar_t>();
  const scalar_t* b2 = boxes2.data_ptr<scalar_t>();
  const bool* f1 = flips1.data_ptr<bool>();
  const bool* f2 = flips2.data_ptr<bool>();
  scalar_t* dst = out.data_ptr<scalar_t>();
#ifdef _OPENMP
#pragma omp parallel num_threads(cpu_threads(batch)) if (batch > 1)
#endif
  {
    Tables<acc_t> tables(n);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t b = 0; b < batch; ++b) {
      box_edges(b1 + 4 * b, n, tables.x1.data(), tables.y1.data());
      box_edges(b2 + 4 * b, n, tables.x2.data(), tables.y2.data());
      fill_tables(tables, f1[b], f2[b], n);
      image_correspondence(tables, metric, n, dst + b * regions * regions);
    }
  }
}

torch::Tensor correspondence_cpu(const torch::Tensor& boxes1, const torch::Tensor& flips1,
                                 const torch::Tensor& boxes2, const torch::Tensor& flips2,
                                 int64_t n, const std::string& metric) {
  geometry::check_view_cpu(boxes1, flips1);
  geometry::check_view_cpu(boxes2, flips2);
  TORCH_CHECK(boxes2.scalar_type() == boxes1.scalar_type() && boxes2.size(0) == boxes1.size(0),
              "mgc_kernels native: boxes2 must match boxes1's dtype and batch");
  TORCH_CHECK(n >= 1, "mgc_kernels native: n must be positive");
  const Metric parsed = geometry::parse_metric(metric);
  const auto b1 = boxes1.contiguous(), b2 = boxes2.contiguous();
  const auto f1 = flips1.contiguous(), f2 = flips2.contiguous();
  auto out = at::empty({boxes1.size(0), n * n, n * n}, boxes1.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, b1.scalar_type(), "correspondence_cpu",
      [&] { correspondence_kernel<scalar_t>(b1, f1, b2, f2, n, parsed, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgc_kernels_native, CPU, m) {
  m.impl("correspondence", &correspondence_cpu);
}

}  // namespace mgc
