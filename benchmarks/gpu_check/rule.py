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
# gradients' slack in units of max|exact|: a 16-bit kernel rounds each fp32 softmax tile to the
# input dtype before the second dot (about u * max|exact|), plus subnormal tiles and sum order
GRAD_SLACK = {torch.float32: 2.0**-14, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}


def representable(x: torch.Tensor) -> torch.Tensor:
    """fp32 values exact in bf16 and fp16 (all below 1 in magnitude)."""
    x = x.to(torch.bfloat16).float()
    return torch.where(x.abs() < 2.0**-14, 0.0, x)


def unit_rows(gen: torch.Generator, n: int, d: int = 128) -> torch.Tensor:
    """``n`` random unit rows (up to the rounding of ``representable``), fp32 on the CPU."""
    return representable(torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1))


def output_tol(exact: torch.Tensor, scale: float = 1.0) -> float:
    """fp32 per-row outputs (losses, lse): both backends accumulate in fp32, in other orders."""
    return 2.0**-16 * scale * max(1.0, exact.abs().max().item())


def ulp_tol(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of each entry rounded to ``dtype`` (twice the worst rounding
    error ``u * max(|x|, smallest normal)``, which holds for subnormal results too): the fast
    backend and the reference may round to different neighbours."""
    return 2 * UNIT_ROUNDOFF[dtype] * exact.abs().clamp_min(torch.finfo(dtype).smallest_normal)


def grad_tol(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradients in ``dtype``: an ulp of each entry plus ``GRAD_SLACK * max|exact|``."""
    return ulp_tol(exact, dtype) + GRAD_SLACK[dtype] * exact.abs().max()


def pool_tol(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Means (``multigrain_pool``): two units in the last place of the result's dtype (the fp32
    sums of a fast backend and of the reference differ in order, so their roundings to
    ``dtype`` may differ by one), plus a floor."""
    floor = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-5)
    return 2 * torch.finfo(dtype).eps * exact.abs() + floor


def excess(fast: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, tol) -> float:
    """How far ``fast`` is beyond the rule at its worst entry (<= 0: it obeys the rule)."""
    fast, reference, exact = fast.double(), reference.double(), exact.double()
    if fast.shape != exact.shape:
        return float("inf")
    if fast.numel() == 0:
        return 0.0
    over = (fast - exact).abs() - ((reference - exact).abs() + tol)
    return float("inf") if over.isnan().any() else over.max().item()
