// CUDA kernels of `multigrain_pool`: mean pooling of a [B, grid*grid, C] token grid into c x c
// blocks for several cell sizes c at once, and its backward (reference/multigrain_pool.py).
//
// Both kernels are bandwidth bound, so both move 16-byte vectors along C (coalesced: the
// threads of a block walk consecutive vectors of consecutive rows) and accumulate in fp32
// (fp64 for fp64 tokens).
// - Forward: one launch for up to kMaxCells cells; a thread row of a block owns one output
//   region (image, cell, region) and sums its c*c token vectors. The regions of one image are
//   neighbours in launch order, so a token re-read by another cell comes from L2, not HBM.
// - Backward: one launch writes each token's gradient once, the sum over cells (in the order
//   of `cells`, as the reference) of its region's gradient times 1 / c^2: a scatter written as
//   a gather, without atomics, deterministic. More than kMaxCells cells take one launch per
//   group, accumulating in an fp32/fp64 buffer in the same order.
// Offsets are int64: B * grid*grid * C may pass 2**31.
#include "native.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace mgc {
namespace {

constexpr int kMaxCells = 8;
constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

// VEC elements moved as one aligned load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vector {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vector<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Vector<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Vector<T, VEC>& x) {
  *reinterpret_cast<Vector<T, VEC>*>(p) = x;
}

// The cells of one launch: sizes, regions per side, and one tensor per cell (outputs in the
// forward, gradients in the backward). `first_region` is the prefix sum of regions per image.
template <typename T>
struct CellTable {
  int count;
  int cell[kMaxCells];
  int side[kMaxCells];
  int64_t first_region[kMaxCells + 1];
  T* data[kMaxCells];
};

// A thread row (threadIdx.y) per (image, region of some cell); threadIdx.x walks the C/VEC
// channel vectors.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void pool_forward_kernel(const scalar_t* __restrict__ tokens,
                                    CellTable<scalar_t> table, int64_t batch, int grid,
                                    int64_t vectors) {
  const int64_t regions = table.first_region[table.count];
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (item >= batch * regions) return;
  const int64_t image = item / regions;
  int64_t region = item - image * regions;
  int slot = 0;
  while (region >= table.first_region[slot + 1]) ++slot;
  region -= table.first_region[slot];
  const int c = table.cell[slot], side = table.side[slot];
  const int row0 = static_cast<int>(region / side) * c;
  const int col0 = static_cast<int>(region % side) * c;
  const int64_t channels = vectors * VEC;
  const scalar_t* image_tokens = tokens + image * grid * grid * channels;
  scalar_t* out = table.data[slot] + (image * side * side + region) * channels;
  const acc_t scale = acc_t(1) / static_cast<acc_t>(c * c);  // torch's mean: sum * (1 / count)
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    acc_t sum[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum[e] = acc_t(0);
    for (int dy = 0; dy < c; ++dy) {
      const scalar_t* row = image_tokens + (static_cast<int64_t>(row0 + dy) * grid + col0) *
                                               channels + v * VEC;
      for (int dx = 0; dx < c; ++dx) {
        const auto x = load<scalar_t, VEC>(row + dx * channels);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum[e] += static_cast<acc_t>(x.v[e]);
      }
    }
    Vector<scalar_t, VEC> mean;
#pragma unroll
    for (int e = 0; e < VEC; ++e) mean.v[e] = static_cast<scalar_t>(sum[e] * scale);
    store<scalar_t, VEC>(out + v * VEC, mean);
  }
}

// A thread row per token (image, token); out_t is the gradient's dtype, or acc_t when more
// launches follow; `previous` (nullable, acc_t) holds the sum over earlier groups of cells.
template <typename scalar_t, typename out_t, typename acc_t, int VEC>
__global__ void pool_backward_kernel(CellTable<const scalar_t> table,
                                     const acc_t* __restrict__ previous,
                                     out_t* __restrict__ out, int64_t batch, int grid,
                                     int64_t vectors) {
  const int64_t tokens = static_cast<int64_t>(grid) * grid;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (item >= batch * tokens) return;
  const int64_t image = item / tokens;
  const int token = static_cast<int>(item - image * tokens);
  const int ty = token / grid, tx = token % grid;
  const int64_t channels = vectors * VEC;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    acc_t total[VEC];
    if (previous != nullptr) {
      const auto p = load<acc_t, VEC>(previous + item * channels + v * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) total[e] = p.v[e];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) total[e] = acc_t(0);
    }
    for (int slot = 0; slot < table.count; ++slot) {
      const int c = table.cell[slot], side = table.side[slot];
      const int64_t region = image * side * side + (ty / c) * side + tx / c;
      const auto g = load<scalar_t, VEC>(table.data[slot] + region * channels + v * VEC);
      const acc_t scale = acc_t(1) / static_cast<acc_t>(c * c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) total[e] += static_cast<acc_t>(g.v[e]) * scale;
    }
    Vector<out_t, VEC> result;
#pragma unroll
    for (int e = 0; e < VEC; ++e) result.v[e] = static_cast<out_t>(total[e]);
    store<out_t, VEC>(out + item * channels + v * VEC, result);
  }
}

// ---------------------------------------------------------------------------------- host --

bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0; }

// Threads per block: x over the channel vectors, y over rows (regions or tokens), 256 in all.
dim3 block_shape(int64_t vectors) {
  const int x = static_cast<int>(std::min<int64_t>(std::max<int64_t>(vectors, 1), kThreads));
  return dim3(x, std::max(1, kThreads / x));
}

dim3 grid_shape(int64_t rows, const dim3& block) {
  const int64_t blocks = (rows + block.y - 1) / block.y;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "mgc_kernels native: too many rows for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

void check_cells(int64_t grid, const std::vector<int64_t>& cells) {
  TORCH_CHECK(!cells.empty(), "mgc_kernels native: cells must not be empty");
  TORCH_CHECK(grid >= 1 && grid <= 46340, "mgc_kernels native: grid out of range");
  for (const int64_t c : cells) {
    TORCH_CHECK(c >= 1 && grid % c == 0, "mgc_kernels native: cell ", c, " does not divide grid ",
                grid);
  }
}

// Cells [begin, end) of `cells` (at most kMaxCells) with their tensors.
template <typename T>
CellTable<T> make_table(const std::vector<int64_t>& cells, size_t begin, size_t end,
                        int64_t grid, const std::vector<T*>& data) {
  CellTable<T> table{};
  table.count = static_cast<int>(end - begin);
  table.first_region[0] = 0;
  for (size_t i = begin; i < end; ++i) {
    const int slot = static_cast<int>(i - begin);
    table.cell[slot] = static_cast<int>(cells[i]);
    table.side[slot] = static_cast<int>(grid / cells[i]);
    table.first_region[slot + 1] =
        table.first_region[slot] + int64_t(table.side[slot]) * table.side[slot];
    table.data[slot] = data[i];
  }
  return table;
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_forward(const torch::Tensor& tokens, const std::vector<torch::Tensor>& outs,
                    int64_t grid, const std::vector<int64_t>& cells) {
  const int64_t batch = tokens.size(0);
  const int64_t vectors = tokens.size(2) / VEC;
  std::vector<scalar_t*> data;
  for (const auto& o : outs) data.push_back(o.data_ptr<scalar_t>());
  const dim3 block = block_shape(vectors);
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (size_t begin = 0; begin < cells.size(); begin += kMaxCells) {
    const size_t end = std::min(cells.size(), begin + kMaxCells);
    const auto table = make_table(cells, begin, end, grid, data);
    const int64_t rows = batch * table.first_region[table.count];
    pool_forward_kernel<scalar_t, acc_t, VEC><<<grid_shape(rows, block), block, 0, stream>>>(
        tokens.data_ptr<scalar_t>(), table, batch, static_cast<int>(grid), vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t, int VEC>
torch::Tensor launch_backward(const std::vector<torch::Tensor>& grads, int64_t grid,
                              const std::vector<int64_t>& cells) {
  const auto& first = grads[0];
  const int64_t batch = first.size(0), channels = first.size(2);
  const int64_t vectors = channels / VEC;
  std::vector<const scalar_t*> data;
  for (const auto& g : grads) data.push_back(g.data_ptr<scalar_t>());
  const dim3 block = block_shape(vectors);
  const dim3 blocks = grid_shape(batch * grid * grid, block);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (cells.size() <= static_cast<size_t>(kMaxCells)) {  // the usual case: one pass
    auto out = torch::empty({batch, grid * grid, channels}, first.options());
    const auto table = make_table(cells, 0, cells.size(), grid, data);
    pool_backward_kernel<scalar_t, scalar_t, acc_t, VEC><<<blocks, block, 0, stream>>>(
        table, nullptr, out.data_ptr<scalar_t>(), batch, static_cast<int>(grid), vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  // groups of cells: ping-pong between two accumulation buffers (a kernel never reads what
  // another thread of it writes), then one cast to the gradients' dtype
  const auto acc_options = first.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto sum = torch::empty({batch, grid * grid, channels}, acc_options);
  auto next = torch::empty_like(sum);
  const acc_t* previous = nullptr;
  for (size_t begin = 0; begin < cells.size(); begin += kMaxCells) {
    const size_t end = std::min(cells.size(), begin + kMaxCells);
    const auto table = make_table(cells, begin, end, grid, data);
    pool_backward_kernel<scalar_t, acc_t, acc_t, VEC><<<blocks, block, 0, stream>>>(
        table, previous, next.data_ptr<acc_t>(), batch, static_cast<int>(grid), vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::swap(sum, next);
    previous = sum.data_ptr<acc_t>();
  }
  return sum.to(first.scalar_type());
}

std::vector<torch::Tensor> multigrain_pool_cuda(const torch::Tensor& tokens, int64_t grid,
                                                const std::vector<int64_t>& cells) {
  check_cells(grid, cells);
  TORCH_CHECK(tokens.is_cuda() && tokens.dim() == 3 && tokens.size(1) == grid * grid,
              "mgc_kernels native: tokens must be a CUDA [B, grid*grid, C] tensor");
  const c10::cuda::CUDAGuard guard(tokens.device());
  const auto x = tokens.contiguous();
  const int64_t batch = x.size(0), channels = x.size(2);
  std::vector<torch::Tensor> outs;
  for (const int64_t c : cells) {
    outs.push_back(torch::empty({batch, (grid / c) * (grid / c), channels}, x.options()));
  }
  if (batch == 0 || channels == 0) return outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "multigrain_pool_cuda",
      [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        constexpr int vec = kVectorBytes / sizeof(scalar_t);
        bool wide = channels % vec == 0 && aligned(x.data_ptr());
        for (const auto& o : outs) wide = wide && aligned(o.data_ptr());
        if (wide) {
          launch_forward<scalar_t, acc_t, vec>(x, outs, grid, cells);
        } else {
          launch_forward<scalar_t, acc_t, 1>(x, outs, grid, cells);
        }
      });
  return outs;
}

torch::Tensor multigrain_pool_backward_cuda(const std::vector<torch::Tensor>& grads,
                                            int64_t grid, const std::vector<int64_t>& cells) {
  check_cells(grid, cells);
  TORCH_CHECK(grads.size() == cells.size(), "mgc_kernels native: one gradient per cell expected");
  const auto& first = grads[0];
  TORCH_CHECK(first.is_cuda() && first.dim() == 3, "mgc_kernels native: expected CUDA grads");
  const c10::cuda::CUDAGuard guard(first.device());
  const int64_t batch = first.size(0), channels = first.size(2);
  std::vector<torch::Tensor> gs;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t side = grid / cells[i];
    TORCH_CHECK(grads[i].device() == first.device() && grads[i].dim() == 3 &&
                    grads[i].size(0) == batch && grads[i].size(1) == side * side &&
                    grads[i].size(2) == channels,
                "mgc_kernels native: gradient ", i, " must be [B, (grid/c)^2, C] on one device");
    // one dtype: rounding a wider gradient to the first one's would lose precision silently
    TORCH_CHECK(grads[i].scalar_type() == first.scalar_type(),
                "mgc_kernels native: the gradients must share one dtype");
    gs.push_back(grads[i].contiguous());
  }
  if (batch == 0 || channels == 0) {
    return torch::zeros({batch, grid * grid, channels}, first.options());
  }
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, first.scalar_type(),
      "multigrain_pool_backward_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        constexpr int vec = kVectorBytes / sizeof(scalar_t);
        bool wide = channels % vec == 0;
        for (const auto& g : gs) wide = wide && aligned(g.data_ptr());
        out = wide ? launch_backward<scalar_t, acc_t, vec>(gs, grid, cells)
                   : launch_backward<scalar_t, acc_t, 1>(gs, grid, cells);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgc_kernels_native, CUDA, m) {
  m.impl("multigrain_pool", &multigrain_pool_cuda);
  m.impl("multigrain_pool_backward", &multigrain_pool_backward_cuda);
}

}  // namespace mgc
