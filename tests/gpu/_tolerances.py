"""Inputs exact in every dtype and the tolerance rule for the compiled-kernel tests."""
import torch

try:
    from .._helpers import assert_close_to_exact
except ImportError:
    from _helpers import assert_close_to_exact

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
GRAD_SLACK = {torch.float32: 2.0**-14, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}


def representable(x: torch.Tensor) -> torch.Tensor:
    """fp32 values exact in bf16 and fp16: rounded to bf16 (8 significant bits) and, as all
    are below 1 in magnitude, flushed to 0 under fp16's smallest normal 2**-14."""
    x = x.to(torch.bfloat16).float()
    return torch.where(x.abs() < 2.0**-14, 0.0, x).cuda()


def unit_rows(gen, n, d=128):
    return representable(torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1))


def assert_grads(fast, ref32, exact, dtype):
    """Gradients in ``dtype``; ``ref32`` is the reference before its final rounding to ``dtype``."""
    for f, r, e in zip(fast, ref32, exact):
        assert f.dtype == dtype and f.shape == e.shape
        assert torch.isfinite(f).all()
        tol = 2 * UNIT_ROUNDOFF[dtype] * e.abs() + GRAD_SLACK[dtype] * e.abs().max()
        assert_close_to_exact(f, r.to(dtype), e, tol)
