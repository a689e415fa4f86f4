// multigrain_pool on CPU: the mean of every c x c block of a [B, grid*grid, C] token grid for
// several cell sizes c, and its backward, as mgc_kernels/reference/multigrain_pool.py (fp32
// accumulation, fp64 for fp64 tokens). Work is split over (image, block row) in the forward and
// (image, token row) in the backward so that even one image keeps every thread busy; the channel
// loops are innermost and contiguous so the compiler vectorises them.
#include "native.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace mgc {
namespace {

void check_cells(int64_t grid, const std::vector<int64_t>& cells) {
  TORCH_CHECK(grid >= 1 && !cells.empty(), "mgc_kernels native: need grid >= 1 and some cells");
  for (const int64_t c : cells) {
    TORCH_CHECK(c >= 1 && grid % c == 0, "mgc_kernels native: cell ", c,
                " does not divide grid ", grid);
  }
}

// Sums the c token rows of block row `block_row` of one image into sums [n, C], then writes
// their means to out [n, C] (the block row's n regions).
template <typename scalar_t, typename acc_t>
void pool_block_row(const scalar_t* image, int64_t grid, int64_t c, int64_t channels,
                    int64_t block_row, acc_t* sums, scalar_t* out) {
  const int64_t n = grid / c;
  std::fill(sums, sums + n * channels, acc_t(0));
  for (int64_t y = block_row * c; y < (block_row + 1) * c; ++y) {
    for (int64_t x = 0; x < grid; ++x) {
      const scalar_t* token = image + (y * grid + x) * channels;
      acc_t* sum = sums + (x / c) * channels;
      for (int64_t ch = 0; ch < channels; ++ch) sum[ch] += static_cast<acc_t>(token[ch]);
    }
  }
  const acc_t count = static_cast<acc_t>(c * c);
  for (int64_t i = 0; i < n * channels; ++i) out[i] = static_cast<scalar_t>(sums[i] / count);
}

template <typename scalar_t>
void pool_one_cell(const torch::Tensor& tokens, int64_t grid, int64_t c, torch::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = tokens.size(0), channels = tokens.size(2), n = grid / c;
  const int64_t rows = batch * n;  // work items: (image, block row)
  const scalar_t* src = tokens.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
#ifdef _OPENMP
#pragma omp parallel num_threads(cpu_threads(rows)) if (rows > 1)
#endif
  {
    std::vector<acc_t> sums(n * channels);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t item = 0; item < rows; ++item) {
      const int64_t b = item / n, block_row = item % n;
      pool_block_row(src + b * grid * grid * channels, grid, c, channels, block_row, sums.data(),
                     dst + (b * n * n + block_row * n) * channels);
    }
  }
}

// Token row y of one image: for each cell in order, add every token's block gradient / (c*c),
// the reference's summation order, then write the row in the output dtype.
template <typename scalar_t, typename acc_t>
void spread_token_row(const std::vector<const acc_t*>& grads, const std::vector<int64_t>& cells,
                      int64_t grid, int64_t channels, int64_t y, acc_t* row, scalar_t* out) {
  std::fill(row, row + grid * channels, acc_t(0));
  for (size_t i = 0; i < cells.size(); ++i) {
    const int64_t c = cells[i], n = grid / c;
    const acc_t count = static_cast<acc_t>(c * c);
    const acc_t* block_row = grads[i] + (y / c) * n * channels;
    for (int64_t x = 0; x < grid; ++x) {
      const acc_t* g = block_row + (x / c) * channels;
      acc_t* r = row + x * channels;
      for (int64_t ch = 0; ch < channels; ++ch) r[ch] += g[ch] / count;
    }
  }
  for (int64_t i = 0; i < grid * channels; ++i) out[i] = static_cast<scalar_t>(row[i]);
}

template <typename scalar_t>
void pool_backward(const std::vector<torch::Tensor>& grads_acc, int64_t grid,
                   const std::vector<int64_t>& cells, torch::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = out.size(0), channels = out.size(2);
  const int64_t rows = batch * grid;  // work items: (image, token row)
  std::vector<const acc_t*> bases;
  for (const auto& g : grads_acc) bases.push_back(g.data_ptr<acc_t>());
  scalar_t* dst = out.data_ptr<scalar_t>();
#ifdef _OPENMP
#pragma omp parallel num_threads(cpu_threads(rows)) if (rows > 1)
#endif
  {
    std::vector<acc_t> row(grid * channels);
    std::vector<const acc_t*> image(bases.size());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t item = 0; item < rows; ++item) {
      const int64_t b = item / grid, y = item % grid;
      for (size_t i = 0; i < bases.size(); ++i) {
        const int64_t n = grid / cells[i];
        image[i] = bases[i] + b * n * n * channels;
      }
      spread_token_row(image, cells, grid, channels, y, row.data(),
                       dst + (b * grid + y) * grid * channels);
    }
  }
}

std::vector<torch::Tensor> multigrain_pool_cpu(const torch::Tensor& tokens, int64_t grid,
                                               const std::vector<int64_t>& cells) {
  TORCH_CHECK(tokens.device().is_cpu(), "mgc_kernels native: expected CPU tokens");
  TORCH_CHECK(at::isFloatingType(tokens.scalar_type()), "mgc_kernels native: tokens must be float");
  check_cells(grid, cells);
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(1) == grid * grid,
              "mgc_kernels native: tokens must be [B, grid*grid, C]");
  const auto x = tokens.contiguous();
  std::vector<torch::Tensor> outs;
  for (const int64_t c : cells) {
    const int64_t n = grid / c;
    auto out = at::empty({x.size(0), n * n, x.size(2)}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "multigrain_pool_cpu",
                                    [&] { pool_one_cell<scalar_t>(x, grid, c, out); });
    outs.push_back(out);
  }
  return outs;
}

torch::Tensor multigrain_pool_backward_cpu(const std::vector<torch::Tensor>& grads, int64_t grid,
                                           const std::vector<int64_t>& cells) {
  check_cells(grid, cells);
  TORCH_CHECK(grads.size() == cells.size(), "mgc_kernels native: one gradient per cell");
  const auto dtype = grads[0].scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "mgc_kernels native: gradients must be float");
  const auto acc = at::toOpMathType(dtype);
  const int64_t batch = grads[0].size(0), channels = grads[0].size(2);
  std::vector<torch::Tensor> grads_acc;  // the reference also converts before dividing
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grid / cells[i];
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].dim() == 3 &&
                    grads[i].size(0) == batch && grads[i].size(1) == n * n &&
                    grads[i].size(2) == channels,
                "mgc_kernels native: gradient ", i, " must be CPU [B, (grid/c)^2, C]");
    grads_acc.push_back(grads[i].to(acc).contiguous());
  }
  auto out = at::empty({batch, grid * grid, channels}, grads[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multigrain_pool_backward_cpu",
                                  [&] { pool_backward<scalar_t>(grads_acc, grid, cells, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgc_kernels_native, CPU, m) {
  m.impl("multigrain_pool", &multigrain_pool_cpu);
  m.impl("multigrain_pool_backward", &multigrain_pool_backward_cpu);
}

}  // namespace mgc
