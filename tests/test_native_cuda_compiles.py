"""Every CUDA source of the native backend (csrc/*.cu) compiles with nvcc for sm_90 (H100/H200),
without a GPU.

The CUDA kernels run only on a GPU (tests/gpu/test_native_cuda.py); this proves on any machine
with nvcc that they compile against the installed torch's headers, with the flags the extension
build uses, so a first GPU run does not fail on compilation. The files compile concurrently (one
nvcc each, about a minute apiece) and are reported one test per file. Skipped only when no nvcc
is found (``$CUDA_HOME/bin/nvcc``, then ``/usr/local/cuda/bin/nvcc``, then ``PATH``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from mgc_kernels import native

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
ARCH = "90"
TIMEOUT_S = 600


def find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for path in candidates:
        if path.is_file():
            return str(path)
    return shutil.which("nvcc")


def torch_include_paths() -> list[str]:
    from torch.utils import cpp_extension

    try:  # torch >= 2.6: include_paths(device_type=...)
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=...)
        return cpp_extension.include_paths(cuda=True)


def cxx_standard() -> str:
    """The C++ standard torch's headers require (C++20 from torch 2.10's ATen on)."""
    aten = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    return "c++20" if aten.is_file() and "C++20" in aten.read_text() else "c++17"


@lru_cache(maxsize=1)
def include_flags() -> tuple[str, ...]:
    nvcc = find_nvcc()
    toolkit = [str(Path(nvcc).resolve().parents[1] / "include")] if nvcc else []
    paths = [CSRC.as_posix(), *torch_include_paths(), *toolkit, *native.pip_cuda_include_paths(),
             sysconfig.get_paths()["include"]]
    return tuple(f"-I{p}" for p in dict.fromkeys(paths))   # de-duplicated, order kept


def nvcc_command(source, output) -> list[str]:
    """The nvcc command line that compiles one csrc/*.cu file to an object file as the
    extension build does (torch's headers, its C++ ABI, the backend's macros), for sm_90."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [find_nvcc() or "nvcc", "-c", f"-std={cxx_standard()}", "-O3",
            "--expt-relaxed-constexpr", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=mgc_kernels_native",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC",
            "-gencode", f"arch=compute_{ARCH},code=sm_{ARCH}", *include_flags(),
            str(source), "-o", str(output)]


requires_nvcc = pytest.mark.skipif(
    find_nvcc() is None,
    reason="nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin or PATH): the CUDA sources "
           "cannot be compiled here")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Compile every csrc/*.cu at once (each nvcc is single-threaded): name -> result."""
    out_dir = tmp_path_factory.mktemp("nvcc")

    def compile_one(source: Path):
        return subprocess.run(nvcc_command(source, out_dir / f"{source.stem}.o"),
                              capture_output=True, text=True, timeout=TIMEOUT_S)

    workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((s.name for s in SOURCES), pool.map(compile_one, SOURCES)))


@requires_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_source_compiles_for_sm90(compiled, source):
    result = compiled[source.name]
    assert result.returncode == 0, (f"nvcc failed on {source.name}:\n"
                                    f"{' '.join(result.args)}\n{result.stderr[-8000:]}")
