"""Build entry point. Metadata lives in pyproject.toml.

The native backend's sources (``csrc/``, beside the package in this checkout) travel inside the
wheel as ``mgc_kernels/csrc``, so that an installed package can compile them on first use
(``python -m mgc_kernels.env --build-native``).

``MGC_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`` also compiles them ahead of time
into ``mgc_kernels._native``: ``CUDAExtension`` where nvcc and a CUDA build of torch are present
and there is a GPU to build for (or ``TORCH_CUDA_ARCH_LIST`` names the architectures, e.g.
``"9.0"`` on a build machine without one), else ``CppExtension`` (the sources, flags and the
``WITH_CUDA`` switch are the ones ``mgc_kernels.native`` uses to build on first use). Without the
variable nothing is compiled and the wheel is pure Python.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = "csrc"


class build_py_with_csrc(build_py):
    """``build_py`` that also copies ``csrc/`` into the built package as ``mgc_kernels/csrc``."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "mgc_kernels", CSRC)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target)


def native_extension() -> tuple[list, dict]:
    """The ahead-of-time extension and the command that builds it, with MGC_KERNELS_BUILD_EXT=1."""
    if os.environ.get("MGC_KERNELS_BUILD_EXT") != "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as err:
        raise SystemExit(
            "MGC_KERNELS_BUILD_EXT=1 builds against the installed torch: install "
            "torch first and pass --no-build-isolation to pip"
        ) from err
    from mgc_kernels import native

    cuda = native.ahead_of_time_cuda()
    flags = {
        "cxx": native.CXX_FLAGS + (["-DWITH_CUDA"] if cuda else []),
        "nvcc": native.NVCC_FLAGS + ["-DWITH_CUDA"],
    }
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    sources = [os.path.relpath(path) for path in native.sources(cuda)]  # setuptools wants them
    includes = [str(native.CSRC)] + (native.cuda_include_paths() if cuda else [])
    module = kind(
        "mgc_kernels._native",
        sources,
        include_dirs=includes,
        extra_compile_args=flags,
        extra_link_args=native.LD_FLAGS,
    )
    return [module], {"build_ext": cpp_extension.BuildExtension}


ext_modules, commands = native_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_csrc, **commands})
