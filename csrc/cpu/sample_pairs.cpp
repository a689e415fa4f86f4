// sample_pairs on CPU: the k best positive (view-1 region, view-2 region) pairs of each image by
// their mgc weight, exactly as mgc_kernels/reference/sample_pairs.py returns them (same weights,
// same tie order, same padding). Instead of scoring all (n*n)^2 pairs, each image lists, per axis
// and per view-1 cell, the view-2 cells it overlaps by a positive length (about two each), and
// only visits those pairs: a pair whose width or height overlap is 0 has weight 0 and is never a
// candidate. Pairs are visited in the reference's tie order (view-1 row, column, view-2 row,
// column, all unflipped), so a bounded best-k buffer that keeps earlier pairs ahead of later ones
// of equal weight reproduces the reference's stable sort.
#include "native.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>

namespace mgc {
namespace {

// ----------------------------------------------------------------------------- the released rule

// A stride rule (ratio, lo, hi): stride = clip(floor(IoU * ratio), lo, hi).
struct Rule {
  double ratio, lo, hi;
};

Rule parse_rule(const std::vector<double>& rule, const char* name) {
  TORCH_CHECK(rule.size() == 3 && rule[1] >= 1 && rule[1] <= rule[2], "mgc_kernels native: ",
              name, " must be (ratio, lo, hi) with 1 <= lo <= hi");
  return {rule[0], rule[1], rule[2]};
}

// The view-1 cells (unflipped) visited along one axis: first, first + step, ... up to last.
struct Visit {
  int64_t first, last, step;
  bool contains(int64_t i) const { return i >= first && i <= last && (i - first) % step == 0; }
};

// overlap_span of the reference: float32 arithmetic in the released order on the boxes' own
// dtype differences, then the floor / on-edge logic in double.
template <typename scalar_t>
std::pair<int64_t, int64_t> overlap_span(scalar_t lo1, scalar_t hi1, scalar_t lo2, scalar_t hi2,
                                         double view_size, int64_t n) {
  const float size1 = static_cast<float>(static_cast<scalar_t>(hi1 - lo1));
  const scalar_t o_lo = std::max(lo1, lo2), o_hi = std::min(hi1, hi2);
  const float view32 = static_cast<float>(view_size);
  const float start = (static_cast<float>(static_cast<scalar_t>(o_lo - lo1)) / size1) * view32;
  const float end =
      start + (static_cast<float>(static_cast<scalar_t>(o_hi - o_lo)) / size1) * view32;
  const double cell = view_size / static_cast<double>(n);
  const double first = std::floor(static_cast<double>(start) / cell);
  double last = std::floor(static_cast<double>(end) / cell);
  const double end64 = static_cast<double>(end);
  const bool on_edge = last * cell == end64 || end64 > view_size;
  last -= on_edge ? 1.0 : 0.0;
  return {static_cast<int64_t>(first), static_cast<int64_t>(last)};
}

// crop_iou32 of the reference: areas in double, one float32 division.
template <typename scalar_t>
float crop_iou32(const scalar_t* a, const scalar_t* b) {
  double box1[4], box2[4];
  for (int i = 0; i < 4; ++i) {
    box1[i] = static_cast<double>(a[i]);
    box2[i] = static_cast<double>(b[i]);
  }
  const double w = geometry::overlap(box1[0], box1[2], box2[0], box2[2]);
  const double h = geometry::overlap(box1[1], box1[3], box2[1], box2[3]);
  const double inter = w * h;
  const double area1 = (box1[2] - box1[0]) * (box1[3] - box1[1]);
  const double area2 = (box2[2] - box2[0]) * (box2[3] - box2[1]);
  return static_cast<float>(inter) / static_cast<float>(area1 + area2 - inter);
}

int64_t stride(float iou32, const Rule& rule) {
  const double steps = std::floor(static_cast<double>(iou32 * static_cast<float>(rule.ratio)));
  return static_cast<int64_t>(std::min(std::max(steps, rule.lo), rule.hi));
}

// The rows (y) and columns (x) of view 1 that the released rule visits for one image.
template <typename scalar_t>
std::pair<Visit, Visit> mgc_visits(const scalar_t* box1, const scalar_t* box2, double view_size,
                                   int64_t n, const Rule& row_rule, const Rule& col_rule) {
  const auto rows = overlap_span(box1[1], box1[3], box2[1], box2[3], view_size, n);
  const auto cols = overlap_span(box1[0], box1[2], box2[0], box2[2], view_size, n);
  const float iou = crop_iou32(box1, box2);
  return {Visit{rows.first, rows.second, stride(iou, row_rule)},
          Visit{cols.first, cols.second, stride(iou, col_rule)}};
}

Visit every_cell(int64_t n) { return Visit{0, n - 1, 1}; }

// ----------------------------------------------------------------------------- candidates

// A candidate pair in unflipped region indices (r * n + c) of each view.
template <typename acc_t>
struct Pair {
  acc_t weight;
  int32_t region1, region2;
};

// Per-axis geometry of one image in unflipped cells: edges, cell lengths, and for each view-1
// cell the view-2 cells it overlaps by a positive length, with that length.
template <typename acc_t>
struct Axis {
  explicit Axis(int64_t n) : edges1(n + 1), edges2(n + 1), size1(n), size2(n), count(n),
                             partner(n * n), length(n * n) {}
  std::vector<acc_t> edges1, edges2, size1, size2;
  std::vector<int32_t> count, partner;  // partner[i * n + t], t < count[i], increasing
  std::vector<acc_t> length;

  void fill(acc_t lo1, acc_t hi1, acc_t lo2, acc_t hi2, int64_t n) {
    geometry::region_edges(lo1, hi1, n, edges1.data());
    geometry::region_edges(lo2, hi2, n, edges2.data());
    for (int64_t i = 0; i < n; ++i) {
      size1[i] = edges1[i + 1] - edges1[i];
      size2[i] = edges2[i + 1] - edges2[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      // branch-free: always write at the next free slot, advance only past a positive overlap
      // (found <= j, so the slot stays in row i)
      int32_t found = 0;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t len = geometry::overlap(edges1[i], edges1[i + 1], edges2[j], edges2[j + 1]);
        partner[i * n + found] = static_cast<int32_t>(j);
        length[i * n + found] = len;
        found += len > acc_t(0) ? 1 : 0;
      }
      count[i] = found;
    }
  }
};

// The best `capacity` pairs offered in visiting order, best first, earlier first among equals.
template <typename acc_t>
class BestPairs {
 public:
  void reset(size_t capacity) { capacity_ = capacity, pairs_.clear(); }
  const std::vector<Pair<acc_t>>& pairs() const { return pairs_; }

  void offer(const Pair<acc_t>& pair) {
    if (pairs_.size() == capacity_ && (capacity_ == 0 || pair.weight <= pairs_.back().weight)) {
      return;
    }
    // after every kept pair of weight >= this one: it came later, so it loses ties
    const auto at = std::upper_bound(pairs_.begin(), pairs_.end(), pair,
                                     [](const Pair<acc_t>& a, const Pair<acc_t>& b) {
                                       return a.weight > b.weight;
                                     });
    const auto position = at - pairs_.begin();  // pop_back below invalidates `at`
    if (pairs_.size() == capacity_) pairs_.pop_back();
    pairs_.insert(pairs_.begin() + position, pair);
  }

 private:
  size_t capacity_ = 0;
  std::vector<Pair<acc_t>> pairs_;
};

// Offers every positive-weight pair of the visited view-1 regions, in visiting order. Weights are
// the reference's: inter = w * h, inter / (area1 + area2), rounded through the boxes' dtype
// (the reference's correspondence returns that dtype before it is sorted).
template <typename scalar_t, typename acc_t, typename Sink>
void visit_pairs(const Axis<acc_t>& x, const Axis<acc_t>& y, const Visit& rows, const Visit& cols,
                 int64_t n, Sink&& sink) {
  for (int64_t r1 = 0; r1 < n; ++r1) {
    if (!rows.contains(r1)) continue;
    for (int64_t c1 = 0; c1 < n; ++c1) {
      if (!cols.contains(c1)) continue;
      const acc_t area1 = x.size1[c1] * y.size1[r1];
      for (int32_t s = 0; s < y.count[r1]; ++s) {
        const int64_t r2 = y.partner[r1 * n + s];
        const acc_t h = y.length[r1 * n + s];
        for (int32_t t = 0; t < x.count[c1]; ++t) {
          const int64_t c2 = x.partner[c1 * n + t];
          const acc_t inter = x.length[c1 * n + t] * h;
          const acc_t area2 = x.size2[c2] * y.size2[r2];
          const acc_t weight = static_cast<acc_t>(static_cast<scalar_t>(inter / (area1 + area2)));
          if (weight > acc_t(0)) {
            sink(Pair<acc_t>{weight, static_cast<int32_t>(r1 * n + c1),
                             static_cast<int32_t>(r2 * n + c2)});
          }
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- per image

enum class Method { mgc, topk, all };

Method parse_method(const std::string& method) {
  if (method == "mgc") return Method::mgc;
  if (method == "topk") return Method::topk;
  TORCH_CHECK(method == "all", "mgc_kernels native: unknown method '", method, "'");
  return Method::all;
}

struct Problem {
  int64_t n;
  Method method;
  double view_size;
  Rule row_rule, col_rule;
};

// Scratch of one thread, reused across its images.
template <typename acc_t>
struct Image {
  explicit Image(int64_t n) : x(n), y(n) {}
  Axis<acc_t> x, y;
  BestPairs<acc_t> best;
  std::vector<Pair<acc_t>> every;
};

// Below this capacity a sorted insertion buffer is cheapest; above it (k rarely is) collecting
// every candidate and sorting once avoids quadratic insertion.
constexpr size_t kInsertionCapacity = 64;

// One image's candidates, best first, at most `capacity` (all of them when capacity < 0).
template <typename scalar_t, typename acc_t>
const std::vector<Pair<acc_t>>& image_pairs(Image<acc_t>& im, const scalar_t* box1,
                                            const scalar_t* box2, const Problem& p,
                                            int64_t capacity) {
  using A = acc_t;
  im.x.fill(A(box1[0]), A(box1[2]), A(box2[0]), A(box2[2]), p.n);
  im.y.fill(A(box1[1]), A(box1[3]), A(box2[1]), A(box2[3]), p.n);
  Visit rows = every_cell(p.n), cols = every_cell(p.n);
  if (p.method == Method::mgc) {
    std::tie(rows, cols) = mgc_visits(box1, box2, p.view_size, p.n, p.row_rule, p.col_rule);
  }
  if (capacity >= 0 && static_cast<size_t>(capacity) <= kInsertionCapacity) {
    im.best.reset(static_cast<size_t>(capacity));
    visit_pairs<scalar_t>(im.x, im.y, rows, cols, p.n,
                          [&](const Pair<A>& q) { im.best.offer(q); });
    return im.best.pairs();
  }
  im.every.clear();
  visit_pairs<scalar_t>(im.x, im.y, rows, cols, p.n,
                        [&](const Pair<A>& q) { im.every.push_back(q); });
  std::stable_sort(im.every.begin(), im.every.end(), [](const Pair<A>& a, const Pair<A>& b) {
    return a.weight > b.weight;
  });
  if (capacity >= 0 && im.every.size() > static_cast<size_t>(capacity)) im.every.resize(capacity);
  return im.every;
}

// Writes one image's pairs as token indices (flips mirror columns) and pads the row of k with
// (0, 0, 0).
template <typename scalar_t, typename acc_t>
void write_pairs(const std::vector<Pair<acc_t>>& pairs, bool flip1, bool flip2, int64_t n,
                 int64_t k, int64_t* idx1, int64_t* idx2, scalar_t* weight) {
  const int64_t kept = std::min<int64_t>(k, static_cast<int64_t>(pairs.size()));
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t r1 = pairs[i].region1 / n, c1 = pairs[i].region1 % n;
    const int64_t r2 = pairs[i].region2 / n, c2 = pairs[i].region2 % n;
    idx1[i] = r1 * n + geometry::token_column(flip1, n, c1);
    idx2[i] = r2 * n + geometry::token_column(flip2, n, c2);
    weight[i] = static_cast<scalar_t>(pairs[i].weight);
  }
  std::fill(idx1 + kept, idx1 + k, int64_t(0));
  std::fill(idx2 + kept, idx2 + k, int64_t(0));
  std::fill(weight + kept, weight + k, scalar_t(0));
}

struct Views {
  torch::Tensor boxes1, flips1, boxes2, flips2;
};

using Result = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>;

// Uninitialised [B, k] outputs: write_pairs fills every row, pads included (one allocation
// each and no separate zero-fill, which matters for one image per call).
Result empty_outputs(const Views& v, int64_t k) {
  const int64_t batch = v.boxes1.size(0);
  auto idx1 = at::empty({batch, k}, v.boxes1.options().dtype(at::kLong));
  return {idx1, at::empty_like(idx1), at::empty({batch, k}, v.boxes1.options())};
}

// visit(workspace, b) for every image b of the batch, in parallel over images; each thread
// reuses one workspace.
template <typename acc_t, typename Visit>
void for_each_image(int64_t batch, int64_t n, const Visit& visit) {
#ifdef _OPENMP
#pragma omp parallel num_threads(cpu_threads(batch)) if (batch > 1)
#endif
  {
    Image<acc_t> im(n);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t b = 0; b < batch; ++b) visit(im, b);
  }
}

// methods mgc and topk: a fixed k, one pass writing straight into the outputs.
template <typename scalar_t>
Result sample_fixed_k(const Views& v, const Problem& p, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  Result out = empty_outputs(v, k);
  const int64_t batch = v.boxes1.size(0);
  const scalar_t* b1 = v.boxes1.data_ptr<scalar_t>();
  const scalar_t* b2 = v.boxes2.data_ptr<scalar_t>();
  const bool* f1 = v.flips1.data_ptr<bool>();
  const bool* f2 = v.flips2.data_ptr<bool>();
  int64_t* idx1 = std::get<0>(out).data_ptr<int64_t>();
  int64_t* idx2 = std::get<1>(out).data_ptr<int64_t>();
  scalar_t* weight = std::get<2>(out).data_ptr<scalar_t>();
  // captured by value: captured by reference, the pointers were reloaded around every write
  // (10 % slower at B = 256)
  for_each_image<acc_t>(batch, p.n, [=](Image<acc_t>& im, int64_t b) {
    const auto& pairs = image_pairs(im, b1 + 4 * b, b2 + 4 * b, p, k);
    write_pairs(pairs, f1[b], f2[b], p.n, k, idx1 + b * k, idx2 + b * k, weight + b * k);
  });
  return out;
}

// method all: every positive pair, k = the largest count in the batch, so the images' sorted
// pairs are kept until every image is done.
template <typename scalar_t>
Result sample_all(const Views& v, const Problem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = v.boxes1.size(0);
  const scalar_t* b1 = v.boxes1.data_ptr<scalar_t>();
  const scalar_t* b2 = v.boxes2.data_ptr<scalar_t>();
  std::vector<std::vector<Pair<acc_t>>> per_image(batch);
  for_each_image<acc_t>(batch, p.n, [&](Image<acc_t>& im, int64_t b) {
    per_image[b] = image_pairs(im, b1 + 4 * b, b2 + 4 * b, p, -1);
  });
  int64_t k = 0;
  for (const auto& pairs : per_image) k = std::max<int64_t>(k, pairs.size());
  Result out = empty_outputs(v, k);
  const bool* f1 = v.flips1.data_ptr<bool>();
  const bool* f2 = v.flips2.data_ptr<bool>();
  int64_t* idx1 = std::get<0>(out).data_ptr<int64_t>();
  int64_t* idx2 = std::get<1>(out).data_ptr<int64_t>();
  scalar_t* weight = std::get<2>(out).data_ptr<scalar_t>();
  for (int64_t b = 0; b < batch; ++b) {
    write_pairs(per_image[b], f1[b], f2[b], p.n, k, idx1 + b * k, idx2 + b * k, weight + b * k);
  }
  return out;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sample_pairs_cpu(
    const torch::Tensor& boxes1, const torch::Tensor& flips1, const torch::Tensor& boxes2,
    const torch::Tensor& flips2, int64_t n, int64_t k, const std::string& method,
    double view_size, const std::vector<double>& row_rule, const std::vector<double>& col_rule) {
  geometry::check_view_cpu(boxes1, flips1);
  geometry::check_view_cpu(boxes2, flips2);
  TORCH_CHECK(boxes2.scalar_type() == boxes1.scalar_type() && boxes2.size(0) == boxes1.size(0),
              "mgc_kernels native: boxes2 must match boxes1's dtype and batch");
  TORCH_CHECK(n >= 1 && n * n <= INT32_MAX, "mgc_kernels native: n out of range");
  const Problem p{n, parse_method(method), view_size, parse_rule(row_rule, "row_rule"),
                  parse_rule(col_rule, "col_rule")};
  TORCH_CHECK(p.method == Method::all || k >= 0, "mgc_kernels native: k must be >= 0");
  const Views v{boxes1.contiguous(), flips1.contiguous(), boxes2.contiguous(),
                flips2.contiguous()};
  Result out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.boxes1.scalar_type(),
                                  "sample_pairs_cpu", [&] {
    out = p.method == Method::all ? sample_all<scalar_t>(v, p) : sample_fixed_k<scalar_t>(v, p, k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgc_kernels_native, CPU, m) {
  m.impl("sample_pairs", &sample_pairs_cpu);
}

}  // namespace mgc
