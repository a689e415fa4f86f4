"""Build entry point. Metadata lives in pyproject.toml.

``MGC_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .`` also compiles the native
backend's csrc/ ahead of time into ``mgc_kernels._native``: ``CUDAExtension`` where nvcc and a
CUDA build of torch are present and there is a GPU to build for (or ``TORCH_CUDA_ARCH_LIST`` names
the architectures, e.g. ``"9.0"`` on a build machine without one), else ``CppExtension`` (the
sources, flags and the ``WITH_CUDA`` switch are the ones ``mgc_kernels.native`` uses to build on
first use). Without the variable a plain install compiles nothing.
"""
import os

from setuptools import setup


def native_extension() -> dict:
    if os.environ.get("MGC_KERNELS_BUILD_EXT") != "1":
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError as err:
        raise SystemExit("MGC_KERNELS_BUILD_EXT=1 builds against the installed torch: install "
                         "torch first and pass --no-build-isolation to pip") from err
    from mgc_kernels import native

    cuda = native.ahead_of_time_cuda()
    flags = {"cxx": native.CXX_FLAGS + (["-DWITH_CUDA"] if cuda else []),
             "nvcc": native.NVCC_FLAGS + ["-DWITH_CUDA"]}
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    sources = [os.path.relpath(path) for path in native.sources(cuda)]  # setuptools wants them
    includes = [str(native.CSRC)] + (native.cuda_include_paths() if cuda else [])
    module = kind("mgc_kernels._native", sources, include_dirs=includes, extra_compile_args=flags,
                  extra_link_args=native.LD_FLAGS)
    return {"ext_modules": [module], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**native_extension())
