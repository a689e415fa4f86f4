"""The comparison rule for fast backends, device-generic (CPU for --dry-run, CUDA for real).

Cut Cross-Entropy's rule: ``|fast - exact| <= |reference - exact| + tol`` elementwise, ``exact``
computed in fp64 from the same inputs, ``reference`` the torch backend in the fast one's dtype.
Inputs are made exactly representable in fp32, bf16 and fp16 (rounded to bf16, tiny values
flushed under fp16's smallest normal), so one fp64 result is exact for every dtype. The tolerances
are the ones ``tests/gpu`` uses (see its modules' docstrings for the derivations).
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
GRAD_SLACK = {torch.float32: 2.0**-14, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}


def representable(x: torch.Tensor) -> torch.Tensor:
    """fp32 values exact in bf16 and fp16 (all below 1 in magnitude)."""
    x = x.to(torch.bfloat16).float()
    return torch.where(x.abs() < 2.0**-14, 0.0, x)


def unit_rows(gen: torch.Generator, n: int, d: int = 128) -> torch.Tensor:
    return representable(torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1))


def output_tol(exact: torch.Tensor, scale: float = 1.0) -> float:
    """fp32 per-row outputs (losses, lse): both backends accumulate in fp32, in other orders."""
    return 2.0**-16 * scale * max(1.0, exact.abs().max().item())


def grad_tol(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradients in ``dtype``: two units of the result's rounding plus the rounding of the fp32
    softmax tile to ``dtype`` before the tensor-core dot."""
    return 2 * UNIT_ROUNDOFF[dtype] * exact.abs() + GRAD_SLACK[dtype] * exact.abs().max()


def excess(fast: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, tol) -> float:
    """How far ``fast`` is beyond the rule at its worst entry (<= 0: it obeys the rule)."""
    fast, reference, exact = fast.double(), reference.double(), exact.double()
    if fast.shape != exact.shape:
        return float("inf")
    if fast.numel() == 0:
        return 0.0
    over = (fast - exact).abs() - ((reference - exact).abs() + tol)
    return float("inf") if over.isnan().any() else over.max().item()
