"""Every Triton kernel compiles for the GPUs we target (sm_90: H100/H200), without a GPU, and
can launch there at the sizes we benchmark.

The interpreter tests prove the kernels' logic; these prove that Triton's GPU compiler accepts
them, with the JIT's own specialisation of the arguments, and that each compiled variant fits a
block of sm_90 (shared memory, registers), so a first GPU run does not fail on compilation or
launch. They run tests/triton_aot.py in a subprocess because the interpreter (set for this test
session) replaces the JIT functions that ``triton.compile`` needs:

- the toy shapes and the headline benchmark sizes (``--real``) with the installed Triton;
- the headline sizes with Triton 3.6.0, the GPU machine's, from ``.venv-triton36/`` (installed
  there on its own by ``.ci/run``, as the project's torch may require another Triton); skipped,
  with the command that installs it, when that folder is missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import requires_triton

SCRIPT = Path(__file__).with_name("triton_aot.py")
ROOT = SCRIPT.parents[1]
GPU_TRITON = "3.6.0"  # the GPU machine's Triton
GPU_TRITON_DIR = ROOT / ".venv-triton36"
INSTALL_GPU_TRITON = (
    f".venv/bin/pip install --no-deps --target {GPU_TRITON_DIR.name} triton=={GPU_TRITON}"
)

# every kernel of mgc_kernels/triton, and which of them the headline sizes must reach
KERNELS = {
    "region_boxes.region_boxes_kernel",
    "correspondence.correspondence_kernel",
    "sample_pairs.sample_pairs_kernel",
    "multigrain_pool._pool_fwd_kernel",
    "multigrain_pool._pool_bwd_kernel",
    "info_nce._forward_kernel",
    "info_nce._dk_kernel",
    "linear_soft_ce._forward_kernel",
    "linear_soft_ce._dx_kernel",
    "linear_soft_ce._dw_kernel",
}
LINEAR_SOFT_CE_WIDTHS = (256, 512, 768, 1024, 2048)


def compile_all(*flags: str, triton_dir: Path | None = None) -> list[dict]:
    """Run the script; its JSON rows (asserting that it succeeded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's current default, stated explicitly
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_dir), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "compiled" in result.stdout and "FAILED" not in result.stdout
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows and all(row["can_launch"] for row in rows)
    return rows


def cases_of(rows: list[dict], kernel: str, dtype: str) -> set[str]:
    """Every case that launches ``kernel`` in ``dtype`` (variants shared between cases list the
    others under ``also``)."""
    found = set()
    for row in rows:
        if row["kernel"] == kernel:
            found |= {f"{row['case']} [{row['dtype']}]", *row["also"]}
    return {case[: -len(f" [{dtype}]")] for case in found if case.endswith(f" [{dtype}]")}


def check_real(rows: list[dict], version: str) -> None:
    assert {row["triton"] for row in rows} == {version}
    assert {row["kernel"] for row in rows} == KERNELS
    for row in rows:
        assert {"regs", "spill_bytes", "shared_bytes", "num_warps", "num_stages"} <= set(row)
        assert 0 < row["regs"] <= 255 and row["shared_bytes"] <= 232448
    for dtype in ("fp32", "bf16", "fp16"):
        for kernel in ("_forward_kernel", "_dk_kernel"):
            assert any(
                c.startswith("geometric_info_nce B=256 cell=1 N=50176 metric=mgc")
                for c in cases_of(rows, f"info_nce.{kernel}", dtype)
            ), (kernel, dtype)
        for kernel in ("_forward_kernel", "_dx_kernel", "_dw_kernel"):
            cases = cases_of(rows, f"linear_soft_ce.{kernel}", dtype)
            widths = LINEAR_SOFT_CE_WIDTHS if dtype != "fp16" else (256,)
            for width in widths:
                for teacher in ("weights", "logits"):
                    assert f"linear_soft_ce N=5632 D={width} K=65536 teacher={teacher}" in cases
    # the attention-shaped InfoNCE kernels at D = 128 in 16-bit: no spills, and a hot loop of
    # two dots (forward: q k^T and p k; dk: k q^T and ds q), i.e. 12 wgmma per 128 x 64 tile
    for row in rows:
        if row["kernel"].startswith("info_nce.") and row["dtype"] != "fp32":
            assert row["spill_bytes"] == 0, row
            assert any(loop["mma"] >= 12 for loop in row["loops"]), row
    # the JIT's specialisation reached the compiled code: P = 1 is a constant, sizes and
    # pointers are known to be multiples of 16
    sparse = [
        row
        for row in rows
        if row["kernel"] == "info_nce._forward_kernel"
        and row["case"].startswith("info_nce sparse")
        and row["case"].endswith(" P=1")
    ]
    assert len(sparse) == 3 and all(row["equal_to_1"] == ["P"] for row in sparse)
    assert all({"N", "M", "D", "Q", "K"} <= set(row["divisible_by_16"]) for row in sparse)


@requires_triton
def test_every_kernel_compiles_for_sm90():
    rows = compile_all()
    assert {row["kernel"] for row in rows} == KERNELS


@requires_triton
def test_real_size_launches_fit_sm90():
    import triton

    check_real(compile_all("--real"), triton.__version__)


@requires_triton
def test_real_size_launches_fit_sm90_with_the_gpu_machines_triton():
    if not (GPU_TRITON_DIR / "triton").is_dir():
        pytest.skip(
            f"Triton {GPU_TRITON} (the GPU machine's) is not installed in "
            f"{GPU_TRITON_DIR.name}/; bash .ci/run installs it: {INSTALL_GPU_TRITON}"
        )
    check_real(compile_all("--real", triton_dir=GPU_TRITON_DIR), GPU_TRITON)


def test_launch_limits_of_sm90():
    from benchmarks.triton_resources import SM90, allocated_registers, launch_problems

    fits = dict(shared_bytes=232448, threads=256, regs=255)
    assert launch_problems(fits) == []
    assert allocated_registers(255, 256) == 65536
    assert allocated_registers(33, 128) == 4 * 40 * 32  # 33 registers round up to 40 a thread
    assert "shared memory" in launch_problems({**fits, "shared_bytes": 393728})[0]
    assert "occupy 131072 registers" in launch_problems({**fits, "threads": 512})[0]
    assert SM90.shared_per_block == 227 * 1024
