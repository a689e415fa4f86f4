"""The ``native`` backend: the C++ (OpenMP) and CUDA kernels of ``csrc/``.

The extension is found, in this order, as

1. ``mgc_kernels._native``, built ahead of time by ``setup.py`` when ``MGC_KERNELS_BUILD_EXT=1``
   (``CUDAExtension`` where nvcc and a CUDA torch are present, else ``CppExtension``);
2. a finished earlier build in the extension cache (``TORCH_EXTENSIONS_DIR``, else
   ``~/.cache/torch_extensions``), in a folder named by a digest of the sources, the flags, torch
   and Python, so that a cached build is never one of other sources or another torch;
3. a build of the sources with ninja (``torch.utils.cpp_extension.load``) into that folder: C++
   always, CUDA too when a GPU and nvcc are present. Only an explicit ``backend="native"`` or
   ``python -m mgc_kernels.env --build-native`` builds; ``auto`` uses what 1 and 2 find.

The sources are ``mgc_kernels/csrc/`` in an installed wheel (package data) and ``csrc/`` beside
the package in a source checkout. A build that fails, or an ahead-of-time extension built for
another torch, gives one warning; the backend then reports itself unavailable with the reason
(``python -m mgc_kernels.env``) and explicit requests raise that reason. A plain ``pip install``
never needs a compiler.

Loading the extension registers its ops with PyTorch's dispatcher as
``torch.ops.mgc_kernels_native.<op>`` (``TORCH_LIBRARY`` in ``csrc/bindings.cpp``, the kernels of
each device by ``TORCH_LIBRARY_IMPL`` in ``csrc/cpu/`` and ``csrc/cuda/``), and the dispatcher runs
the CPU or the CUDA kernel by the tensors' device. A process holds one build: torch aborts on a
second library of the same op namespace.

The functions at the bottom take exactly the arguments of the reference functions they stand
beside (``reference/<op>.py``), call those ops and are registered as the ``native``
implementations of the ops.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

PACKAGE = Path(__file__).resolve().parent
CSRC = next(
    (p for p in (PACKAGE / "csrc", PACKAGE.parent / "csrc") if p.is_dir()), PACKAGE / "csrc"
)
JIT_NAME = "mgc_kernels_native"
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]  # no FMA: geometry equals the reference
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
LD_FLAGS = ["-fopenmp"]
BUILT = "built"  # written into a cache folder once its build has loaded: the folder is usable
BUILD_COMMAND = "python -m mgc_kernels.env --build-native"

_loaded: list[tuple[ModuleType, str]] = []  # the extension, once loaded
_not_loaded: list[str] = []  # why a load without compiling found none
_build_failed: list[str] = []  # why the one build attempt of this process failed


def sources(cuda: bool) -> list[str]:
    """The ``csrc/`` files of the extension: the bindings and ``cpu/*.cpp``, and ``cuda/*.cu``
    with ``cuda``. (The two folders let ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu`` share the
    op's name: setuptools names object files by the source's stem, per folder.)"""
    patterns = ("*.cpp", "cpu/*.cpp") + (("cuda/*.cu",) if cuda else ())
    return [str(p) for pattern in patterns for p in sorted(CSRC.glob(pattern))]


def cache_root() -> Path:
    """Where builds on first use go: ``TORCH_EXTENSIONS_DIR``, as for torch's own extensions,
    else ``$XDG_CACHE_HOME/torch_extensions`` (``~/.cache/torch_extensions``)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def build_dir(cuda: bool) -> Path:
    """The cache folder of a build: named by a digest of everything the binary depends on (the
    sources, the flags, torch, Python, the machine), so a folder found is a build of these."""
    digest = hashlib.sha256(
        repr(
            (
                cuda,
                CXX_FLAGS,
                NVCC_FLAGS,
                LD_FLAGS,
                torch.__version__,
                torch.version.cuda,
                sys.version,
                platform.machine(),
            )
        ).encode()
    )
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes())
    return cache_root() / f"{JIT_NAME}{'_cuda' if cuda else ''}_{digest.hexdigest()[:16]}"


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" log line:
    on a machine without a GPU that is expected, and the C++ build does not need CUDA."""
    logger = logging.getLogger("torch.utils.cpp_extension")

    def no_cuda_runtime_line(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")

    logger.addFilter(no_cuda_runtime_line)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(no_cuda_runtime_line)
    return cpp_extension


def nvcc_found() -> bool:
    cuda_home = _cpp_extension().CUDA_HOME
    return (
        torch.version.cuda is not None
        and cuda_home is not None
        and Path(cuda_home, "bin", "nvcc").exists()
    )


def cuda_include_paths() -> list[str]:
    """Header folders the CUDA sources need beyond torch's own: the toolkit's ``include`` first,
    then those of pip's nvidia-* packages (e.g. ``nvidia/cu13/include``). Torch's CUDA headers
    include cusparse.h and friends, which a bare toolkit may not ship; where both have a header,
    the toolkit's must win, since it has to match nvcc (and ``-I`` folders are searched in order,
    before torch's)."""
    cuda_home = _cpp_extension().CUDA_HOME
    toolkit = [str(Path(cuda_home, "include"))] if cuda_home else []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return toolkit
    return toolkit + sorted(
        str(p)
        for root in spec.submodule_search_locations
        for p in Path(root).glob("*/include")
        if p.is_dir()
    )


def ahead_of_time_cuda() -> bool:
    """Whether setup.py compiles the CUDA sources too: nvcc and a CUDA torch, and a GPU to build
    for or the architectures named in ``TORCH_CUDA_ARCH_LIST`` (without either, torch has no
    architecture to pass to nvcc)."""
    return nvcc_found() and (
        torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())
    )


def status(build: bool = True) -> tuple[bool, str]:
    """``(loads, why)``: whether the extension loads, and how or why not. With ``build`` a
    missing extension is compiled now (the first explicit use); without, only a finished build
    counts (what ``auto`` uses)."""
    module, why = _extension(build)
    return module is not None, why


def supports(device: torch.device) -> tuple[bool, str]:
    """Whether the loaded extension runs on ``device`` (CUDA needs a build with the .cu files)."""
    module, why = _extension(build=True)
    if module is None:
        return False, why
    if device.type == "cuda" and not module.with_cuda:
        return False, f"the extension was built without CUDA ({why})"
    if device.type not in ("cpu", "cuda"):
        return False, f"no kernels for {device.type} tensors"
    return True, why


def extension() -> ModuleType:
    module, why = _extension(build=True)
    if module is None:
        raise RuntimeError(f"the native backend is not available: {why}")
    return module


def build() -> tuple[bool, str]:
    """Compile the extension now, unless the build wanted here (CUDA included where a GPU and
    nvcc are present) is already loaded: the one-time ``--build-native`` step. A process that has
    loaded a build without CUDA cannot load another one, so there it fails and says so."""
    module, why = _extension(build=False)
    if module is not None and (module.with_cuda or not _cuda_wanted()):
        return True, why
    if module is not None:
        return False, (
            f"this process has loaded a build without CUDA ({why}) and can hold only one build; "
            f"remove that build and run {BUILD_COMMAND} again to build the CUDA kernels"
        )
    _build_failed.clear()
    module, why = _build()
    if module is None:
        return False, why
    _loaded[:] = [(module, why)]
    return True, why


def _cuda_wanted() -> bool:
    return torch.cuda.is_available() and nvcc_found()


def _extension(build: bool) -> tuple[ModuleType | None, str]:
    if not _loaded and not _not_loaded:
        module, why = _load_built()
        if module is not None:
            _loaded.append((module, why))
        else:
            _not_loaded.append(why)
    if _loaded:
        return _loaded[0]
    if not build:
        return None, _not_loaded[0]
    if not _build_failed:
        module, why = _build()
        if module is not None:
            _loaded.append((module, why))
            return _loaded[0]
        warnings.warn(
            f"mgc_kernels: the native backend is unavailable: {why}", RuntimeWarning, stacklevel=3
        )
        _build_failed.append(why)
    return None, _build_failed[0]


def _load_built() -> tuple[ModuleType | None, str]:
    """The extension without compiling: the ahead-of-time build, else a finished cached build."""
    stale = ""
    try:
        return importlib.import_module(f"{__package__}._native"), "ahead-of-time build"
    except ModuleNotFoundError:
        pass
    except ImportError as err:  # built for another torch: undefined symbols
        stale = f"mgc_kernels._native does not import ({_first_line(err)}); "
    if not sources(cuda=False):
        return None, stale + (
            f"the csrc/ sources are not at {CSRC} (a package built without "
            "them; reinstall mgc_kernels)"
        )
    for cuda in (True, False):
        folder = build_dir(cuda)
        if (folder / BUILT).is_file():
            try:
                return _import(folder), f"built in {folder}"
            except ImportError as err:
                stale += f"the build in {folder} does not import ({_first_line(err)}); "
    return None, stale + f"not built yet ({BUILD_COMMAND} builds it, in a minute or two)"


def _import(folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(folder.name, folder / f"{folder.name}.so")
    if spec is None or spec.loader is None:
        raise ImportError(f"no extension module in {folder}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> tuple[ModuleType | None, str]:
    cpp_extension = _cpp_extension()
    if not sources(cuda=False):
        return None, f"the csrc/ sources are not at {CSRC} (a package built without them)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja) to build csrc/"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, "no C++ compiler found to build csrc/"
    cuda = _cuda_wanted()
    folder = build_dir(cuda)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name=folder.name,
            sources=sources(cuda),
            build_directory=str(folder),
            extra_cflags=CXX_FLAGS + (["-DWITH_CUDA"] if cuda else []),
            extra_cuda_cflags=NVCC_FLAGS + ["-DWITH_CUDA"],
            extra_ldflags=LD_FLAGS,
            extra_include_paths=[str(CSRC)] + (cuda_include_paths() if cuda else []),
            with_cuda=cuda,
            verbose=False,
        )
    except Exception as err:  # a failed build must not break the other backends
        return None, f"building csrc/ failed: {_first_line(err)}"
    (folder / BUILT).write_text(f"{torch.__version__}\n")
    kind = (
        "C++ and CUDA"
        if cuda
        else "C++; CUDA " + ("needs nvcc" if torch.cuda.is_available() else "not built: no GPU")
    )
    return module, f"built in {folder} ({kind})"


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


# --- the ops, with the reference functions' arguments -------------------------------------------


def _op(name: str, first: torch.Tensor):
    """``torch.ops.mgc_kernels_native.<name>``, registered by loading the extension. A build
    without CUDA has no CUDA kernels, and the dispatcher's error for a CUDA tensor would not say
    why: ``first``, the op's first tensor, is checked here."""
    built_with_cuda = extension().with_cuda  # loading the extension registers the ops
    if first.is_cuda and not built_with_cuda:
        raise RuntimeError(
            f"mgc_kernels native: {name} got CUDA tensors but the extension was built without "
            "CUDA; rebuild it where the CUDA toolkit is found, or pass CPU tensors"
        )
    return getattr(torch.ops.mgc_kernels_native, name)


def correspondence(boxes1, flips1, boxes2, flips2, n: int, metric: str) -> torch.Tensor:
    return _op("correspondence", boxes1)(boxes1, flips1, boxes2, flips2, n, metric)


def sample_pairs(
    boxes1,
    flips1,
    boxes2,
    flips2,
    n: int,
    k: int,
    method: str,
    view_size: float,
    row_rule,
    col_rule,
):
    return _op("sample_pairs", boxes1)(
        boxes1, flips1, boxes2, flips2, n, k, method, view_size, list(row_rule), list(col_rule)
    )


def multigrain_pool(tokens: torch.Tensor, grid: int, cells) -> list[torch.Tensor]:
    return _op("multigrain_pool", tokens)(tokens, grid, list(cells))


def multigrain_pool_backward(grads, grid: int, cells) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        raise RuntimeError(
            "mgc_kernels native: multigrain_pool_backward needs grads, one per cell; got none"
        )
    return _op("multigrain_pool_backward", grads[0])(grads, grid, list(cells))
