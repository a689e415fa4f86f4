"""Every Triton kernel compiles for the GPUs we target (sm_90: H100/H200), without a GPU.

The interpreter tests prove the kernels' logic; this proves that Triton's GPU compiler accepts
them and that their shared memory fits, so a first GPU run does not fail on compilation. It
runs tests/triton_aot.py in a subprocess because the interpreter (set for this test session)
replaces the JIT functions that ``triton.compile`` needs.
"""
import os
import subprocess
import sys
from pathlib import Path

try:
    from ._helpers import requires_triton
except ImportError:
    from _helpers import requires_triton

SCRIPT = Path(__file__).with_name("triton_aot.py")


@requires_triton
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"       # Triton's current default, stated explicitly
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "compiled" in result.stdout and "FAILED" not in result.stdout
