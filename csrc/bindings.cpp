// The "native" backend's op library: the schemas of its ops in PyTorch's dispatcher, as
// torch.ops.mgc_kernels_native.<op>. Each kernel source registers its kernels for one device
// (TORCH_LIBRARY_IMPL: CPU in cpu/<op>.cpp, CUDA in cuda/<op>.cu, built only with CUDA), and the
// dispatcher runs the one for the tensors' device. mgc_kernels/native.py loads the extension and
// calls the ops; the Python op wrappers have already validated the user's input.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(mgc_kernels_native, m) {
  // [B, n*n, n*n]: `metric` ("mgc" | "iou" | "ioa") between every region of view 1 and of view 2.
  m.def("correspondence(Tensor boxes1, Tensor flips1, Tensor boxes2, Tensor flips2, int n, "
        "str metric) -> Tensor");
  // (idx1 long [B, k], idx2 long [B, k], weight [B, k]): the best positive pairs, padded (0, 0, 0).
  m.def("sample_pairs(Tensor boxes1, Tensor flips1, Tensor boxes2, Tensor flips2, int n, int k, "
        "str method, float view_size, float[] row_rule, float[] col_rule) "
        "-> (Tensor, Tensor, Tensor)");
  // One [B, (grid/c)^2, C] mean-pooled tensor per cell c of tokens [B, grid*grid, C].
  m.def("multigrain_pool(Tensor tokens, int grid, int[] cells) -> Tensor[]");
  // [B, grid*grid, C]: the gradient of the tokens given one gradient per pooled output.
  m.def("multigrain_pool_backward(Tensor[] grads, int grid, int[] cells) -> Tensor");
}

// The Python module that native.py imports to load the extension (loading registers the ops
// above); it only says whether this build has the CUDA kernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
