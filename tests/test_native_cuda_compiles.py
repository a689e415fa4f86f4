"""The native backend's ahead-of-time CUDA build works without a GPU: ``setup.py build_ext`` with
``MGC_KERNELS_BUILD_EXT=1`` and ``TORCH_CUDA_ARCH_LIST=9.0`` (H100/H200) compiles every csrc/
source, the .cu files with nvcc and torch's own flags, links ``mgc_kernels._native``, and the
module loads, says it has CUDA kernels, registers a CPU and a CUDA kernel of every op with the
dispatcher and runs its C++ path. A CUDA build break fails here, in CI, before any GPU sees it.
Skipped where there is no nvcc or the installed torch has no CUDA.

The toolkit is found from ``CUDA_HOME``, ``/usr/local/cuda`` or ``PATH`` (resolved through
wrappers, which torch's own guess does not do), and handed to the build as ``CUDA_HOME``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200


def find_cuda_home() -> Path | None:
    candidates = (
        [Path(os.environ["CUDA_HOME"], "bin", "nvcc")] if os.environ.get("CUDA_HOME") else []
    )
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    for nvcc in candidates:
        if nvcc.is_file():
            home = nvcc.resolve().parents[1]
            if (home / "include" / "cuda_runtime.h").is_file():
                return home
    return None


CUDA_HOME = find_cuda_home()
pytestmark = pytest.mark.skipif(
    CUDA_HOME is None or torch.version.cuda is None,
    reason="needs nvcc with its toolkit ($CUDA_HOME, /usr/local/cuda or PATH) and a CUDA build "
    "of torch to compile the CUDA sources",
)

LOAD_AND_RUN = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("mgc_kernels._native", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
assert native.with_cuda, "built without the CUDA kernels"
ops = torch.ops.mgc_kernels_native
for op in ("correspondence", "sample_pairs", "multigrain_pool", "multigrain_pool_backward"):
    for device in ("CPU", "CUDA"):
        assert getattr(ops, op).default.has_kernel_for_dispatch_key(device), (op, device)
import mgc_kernels as mk
boxes = torch.tensor([[0.0, 0, 224, 224], [10, 20, 200, 210]])
flips = torch.tensor([False, True])
want = mk.correspondence(boxes, flips, boxes.flip(0), flips, 14, 2, backend="torch")
assert torch.equal(ops.correspondence(boxes, flips, boxes.flip(0), flips, 7, "mgc"), want)
"""


def test_setup_py_builds_the_cuda_extension(tmp_path):
    env = {
        **os.environ,
        "CUDA_HOME": str(CUDA_HOME),
        "MGC_KERNELS_BUILD_EXT": "1",
        "TORCH_CUDA_ARCH_LIST": "9.0",
        "MAX_JOBS": str(os.cpu_count() or 1),
    }
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "temp"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert build.returncode == 0, (
        f"setup.py build_ext failed:\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}"
    )
    objects = sorted(
        p.relative_to(tmp_path / "temp").as_posix() for p in (tmp_path / "temp").rglob("*.o")
    )
    assert [o for o in objects if o.startswith("csrc/cuda/")] == [
        "csrc/cuda/correspondence.o",
        "csrc/cuda/multigrain_pool.o",
        "csrc/cuda/sample_pairs.o",
    ]
    (module,) = (tmp_path / "lib" / "mgc_kernels").glob("_native*.so")
    # an empty extension cache: a process holds one build of the ops, and that is the one here
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(module)],
        cwd=tmp_path,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-6000:]
