// The pybind11 module of the "native" backend: each op runs the C++ CPU kernel for CPU tensors
// and the CUDA kernel for CUDA tensors (when the extension was built with CUDA), chosen by the
// device of the op's first tensor. mgc_kernels/native.py loads it and registers the backend.
#include <torch/extension.h>

#include "native.h"

namespace mgc {
namespace {

#ifndef WITH_CUDA
// Fails clearly on a CUDA tensor when the extension has no CUDA kernels.
[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "mgc_kernels native: ", op, " got CUDA tensors but the extension was "
              "built without CUDA; rebuild it where the CUDA toolkit is found, or pass CPU "
              "tensors");
}
#endif

torch::Tensor correspondence(const torch::Tensor& boxes1, const torch::Tensor& flips1,
                             const torch::Tensor& boxes2, const torch::Tensor& flips2, int64_t n,
                             const std::string& metric) {
  if (boxes1.is_cuda()) {
#ifdef WITH_CUDA
    return correspondence_cuda(boxes1, flips1, boxes2, flips2, n, metric);
#else
    no_cuda("correspondence");
#endif
  }
  return correspondence_cpu(boxes1, flips1, boxes2, flips2, n, metric);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sample_pairs(
    const torch::Tensor& boxes1, const torch::Tensor& flips1, const torch::Tensor& boxes2,
    const torch::Tensor& flips2, int64_t n, int64_t k, const std::string& method,
    double view_size, const std::vector<double>& row_rule, const std::vector<double>& col_rule) {
  if (boxes1.is_cuda()) {
#ifdef WITH_CUDA
    return sample_pairs_cuda(boxes1, flips1, boxes2, flips2, n, k, method, view_size, row_rule,
                             col_rule);
#else
    no_cuda("sample_pairs");
#endif
  }
  return sample_pairs_cpu(boxes1, flips1, boxes2, flips2, n, k, method, view_size, row_rule,
                          col_rule);
}

std::vector<torch::Tensor> multigrain_pool(const torch::Tensor& tokens, int64_t grid,
                                           const std::vector<int64_t>& cells) {
  if (tokens.is_cuda()) {
#ifdef WITH_CUDA
    return multigrain_pool_cuda(tokens, grid, cells);
#else
    no_cuda("multigrain_pool");
#endif
  }
  return multigrain_pool_cpu(tokens, grid, cells);
}

torch::Tensor multigrain_pool_backward(const std::vector<torch::Tensor>& grads, int64_t grid,
                                       const std::vector<int64_t>& cells) {
  TORCH_CHECK(!grads.empty(), "mgc_kernels native: multigrain_pool_backward needs gradients");
  if (grads[0].is_cuda()) {
#ifdef WITH_CUDA
    return multigrain_pool_backward_cuda(grads, grid, cells);
#else
    no_cuda("multigrain_pool_backward");
#endif
  }
  return multigrain_pool_backward_cpu(grads, grid, cells);
}

}  // namespace
}  // namespace mgc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mgc_kernels native backend: C++ (OpenMP) on CPU, CUDA on GPU";
  m.def("correspondence", &mgc::correspondence, "[B, n*n, n*n] region overlap metric",
        py::arg("boxes1"), py::arg("flips1"), py::arg("boxes2"), py::arg("flips2"), py::arg("n"),
        py::arg("metric"));
  m.def("sample_pairs", &mgc::sample_pairs, "(idx1, idx2, weight) of the best region pairs",
        py::arg("boxes1"), py::arg("flips1"), py::arg("boxes2"), py::arg("flips2"), py::arg("n"),
        py::arg("k"), py::arg("method"), py::arg("view_size"), py::arg("row_rule"),
        py::arg("col_rule"));
  m.def("multigrain_pool", &mgc::multigrain_pool, "mean of every c x c block, per cell",
        py::arg("tokens"), py::arg("grid"), py::arg("cells"));
  m.def("multigrain_pool_backward", &mgc::multigrain_pool_backward,
        "gradient of multigrain_pool w.r.t. the tokens", py::arg("grads"), py::arg("grid"),
        py::arg("cells"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
