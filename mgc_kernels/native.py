"""The ``native`` backend: the C++ (OpenMP) and CUDA kernels of ``csrc/``.

The extension is found, in this order, as

1. ``mgc_kernels._native``, built ahead of time by ``setup.py`` when ``MGC_KERNELS_BUILD_EXT=1``
   (``CUDAExtension`` where nvcc and a CUDA torch are present, else ``CppExtension``);
2. a build of ``csrc/`` on first use with ninja (``torch.utils.cpp_extension.load``, cached in
   ``TORCH_EXTENSIONS_DIR``): C++ always, CUDA too when a GPU and nvcc are present.

Nothing is built until the backend is asked for. A build that fails, or an ahead-of-time
extension built for another torch, gives one warning; the backend then reports itself
unavailable with the reason (``python -m mgc_kernels.env``) and explicit requests raise that
reason. A plain ``pip install`` never needs a compiler.

The functions below take exactly the arguments of the reference functions they stand beside
(``reference/<op>.py``) and are registered as the ``native`` implementations of the ops.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
JIT_NAME = "mgc_kernels_native"
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]  # no FMA: geometry equals the reference
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
LD_FLAGS = ["-fopenmp"]

_loaded: list[tuple[ModuleType | None, str]] = []  # filled once per process


def sources(cuda: bool) -> list[str]:
    """The ``csrc/`` files of the extension: the bindings and ``cpu/*.cpp``, and ``cuda/*.cu``
    with ``cuda``. (The two folders let ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu`` share the
    op's name: setuptools names object files by the source's stem, per folder.)"""
    patterns = ("*.cpp", "cpu/*.cpp") + (("cuda/*.cu",) if cuda else ())
    return [str(p) for pattern in patterns for p in sorted(CSRC.glob(pattern))]


def cuda_include_paths() -> list[str]:
    """Header folders the CUDA sources need beyond torch's own: the toolkit's ``include`` first,
    then those of pip's nvidia-* packages (e.g. ``nvidia/cu13/include``). Torch's CUDA headers
    include cusparse.h and friends, which a bare toolkit may not ship; where both have a header,
    the toolkit's must win, since it has to match nvcc (and ``-I`` folders are searched in order,
    before torch's)."""
    from torch.utils.cpp_extension import CUDA_HOME

    toolkit = [str(Path(CUDA_HOME, "include"))] if CUDA_HOME else []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return toolkit
    return toolkit + sorted(str(p) for root in spec.submodule_search_locations
                            for p in Path(root).glob("*/include") if p.is_dir())


def nvcc_found() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None \
        and Path(CUDA_HOME, "bin", "nvcc").exists()


def ahead_of_time_cuda() -> bool:
    """Whether setup.py compiles the CUDA sources too: nvcc and a CUDA torch, and a GPU to build
    for or the architectures named in ``TORCH_CUDA_ARCH_LIST`` (without either, torch has no
    architecture to pass to nvcc)."""
    return nvcc_found() and (torch.cuda.is_available()
                             or bool(os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()))


def status() -> tuple[bool, str]:
    """``(loads, why)``: loads (building on first use) the extension and says how, or why not."""
    module, why = _extension()
    return module is not None, why


def supports(device: torch.device) -> tuple[bool, str]:
    """Whether the loaded extension runs on ``device`` (CUDA needs a build with the .cu files)."""
    module, why = _extension()
    if module is None:
        return False, why
    if device.type == "cuda" and not module.with_cuda:
        return False, f"the extension was built without CUDA ({why})"
    if device.type not in ("cpu", "cuda"):
        return False, f"no kernels for {device.type} tensors"
    return True, why


def extension() -> ModuleType:
    module, why = _extension()
    if module is None:
        raise RuntimeError(f"the native backend is not available: {why}")
    return module


def _extension() -> tuple[ModuleType | None, str]:
    if not _loaded:
        module, why = _load()
        if module is None:
            warnings.warn(f"mgc_kernels: the native backend is unavailable: {why}",
                          RuntimeWarning, stacklevel=3)
        _loaded.append((module, why))
    return _loaded[0]


def _load() -> tuple[ModuleType | None, str]:
    try:
        _native = importlib.import_module(f"{__package__}._native")
    except ModuleNotFoundError:
        stale = ""
    except ImportError as err:  # built for another torch: undefined symbols
        stale = f"mgc_kernels._native does not import ({_first_line(err)}); "
    else:
        return _native, f"ahead-of-time build {Path(_native.__file__).name}"
    module, why = _build()
    return module, stale + why


def _build() -> tuple[ModuleType | None, str]:
    from torch.utils import cpp_extension

    if not CSRC.is_dir() or not sources(cuda=False):
        return None, (f"the csrc/ sources are not at {CSRC} (install from a source checkout, or "
                      "build ahead of time with MGC_KERNELS_BUILD_EXT=1)")
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja) to build csrc/ on first use"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, "no C++ compiler found to build csrc/ on first use"
    cuda = torch.cuda.is_available() and nvcc_found()
    try:
        module = cpp_extension.load(
            name=JIT_NAME + ("_cuda" if cuda else ""), sources=sources(cuda),
            extra_cflags=CXX_FLAGS + (["-DWITH_CUDA"] if cuda else []),
            extra_cuda_cflags=NVCC_FLAGS + ["-DWITH_CUDA"], extra_ldflags=LD_FLAGS,
            extra_include_paths=[str(CSRC)] + (cuda_include_paths() if cuda else []),
            with_cuda=cuda, verbose=False)
    except Exception as err:  # a failed build must not break the other backends
        return None, f"building csrc/ failed: {_first_line(err)}"
    kind = "C++ and CUDA" if cuda else "C++; CUDA " + (
        "needs nvcc" if torch.cuda.is_available() else "not built: no GPU")
    return module, f"built from csrc/ on first use ({kind})"


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


# --- the ops, with the reference functions' arguments -------------------------------------------


def correspondence(boxes1, flips1, boxes2, flips2, n: int, metric: str) -> torch.Tensor:
    return extension().correspondence(boxes1, flips1, boxes2, flips2, n, metric)


def sample_pairs(boxes1, flips1, boxes2, flips2, n: int, k: int, method: str,
                 view_size: float, row_rule, col_rule):
    return tuple(extension().sample_pairs(boxes1, flips1, boxes2, flips2, n, k, method,
                                          view_size, list(row_rule), list(col_rule)))


def multigrain_pool(tokens: torch.Tensor, grid: int, cells) -> list[torch.Tensor]:
    return list(extension().multigrain_pool(tokens, grid, list(cells)))


def multigrain_pool_backward(grads, grid: int, cells) -> torch.Tensor:
    return extension().multigrain_pool_backward(list(grads), grid, list(cells))
