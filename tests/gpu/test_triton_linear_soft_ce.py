"""Compiled Triton ``linear_soft_ce`` on CUDA against the torch reference at ADCLR's size
(N = 5632 rows, D = 256, K_out = 65536) in fp32/bf16/fp16, by the tolerance rule
(docs/methods.md §7)
``|triton - exact| <= |torch - exact| + tol``, plus determinism of the forward.

As in DINO's head, features are unit rows and the prototypes are unit rows (weight-normalised
last layer), so ``|logit| <= 1 / tau``. The inputs are exactly representable in bf16, fp16 and
fp32 (rounded to bf16, tiny values flushed), so one fp64 result is exact for every dtype and one
fp32 reference serves all three (the reference upcasts fp16/bf16 to fp32 and rounds the
gradients to the input dtype only at the end; it works over row chunks, so it fits). Tolerances:

* fp32 row loss and teacher lse: both accumulate in fp32, the kernel over 1024 sequential tiles;
  logits reach 1 / tau_t = 25: ``2**-16 * 32 * max(1, max|exact|)``.
* teacher mean: column sums over 5632 rows in fp32 in another order: ``2**-16 * max|exact|``.
* gradients: one ulp-ish ``2u |exact|`` plus ``GRAD_SLACK * max|exact|`` for the rounding of the
  fp32 ``p - t`` tile to the input dtype (fp16/bf16 tensor-core dots) and the summation order.
"""

from __future__ import annotations

import functools

import pytest
import torch

from _helpers import assert_close_to_exact, assert_grads, leaf
from mgc_kernels.ops.linear_soft_ce import linear_soft_ce
from mgc_kernels.reference import linear_soft_ce as reference

from ._inputs import representable, unit_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N, D, K = 5632, 256, 65536
TAU_S, TAU_T = 0.1, 0.04


def kernels():
    from mgc_kernels.triton import linear_soft_ce as ops

    return ops


def adclr_case(given_logits: bool):
    return problem(N, K, D, given_logits)


@functools.cache
def problem(n: int, k: int, d: int, given_logits: bool):
    """Inputs, and the reference's (fp32) and exact (fp64) outputs and gradients."""
    gen = torch.Generator().manual_seed(n + k + d)
    x, w, y, v = (unit_rows(gen, rows, d) for rows in (n, k, n, k))
    center = representable(0.1 * torch.randn(k, generator=gen))
    grad = torch.full((n,), 1.0 / n, device="cuda")
    teacher, teacher_weight = (representable(y @ v.T), None) if given_logits else (y, v)
    results = []
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype) for t in (x, w, teacher)] + [
            None if teacher_weight is None else teacher_weight.to(dtype),
            center.to(dtype),
        ]
        out = reference.linear_soft_ce(*args, TAU_S, TAU_T)
        grads = reference.linear_soft_ce_backward(
            grad.to(dtype), *args, out[1], out[2], TAU_S, TAU_T
        )
        results.append((*out, *grads))
    return (x, w, teacher, teacher_weight, center, grad), *results


def assert_outputs(fast, ref, exact):
    for name, f, r, e in zip(("row_loss", "lse", "teacher_lse", "teacher_mean"), fast, ref, exact):
        assert f.dtype == torch.float32 and f.shape == e.shape, name
        scale = 1.0 if name == "teacher_mean" else 32.0
        assert_close_to_exact(f, r, e, 2.0**-16 * scale * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_logits", [False, True])
@pytest.mark.parametrize(
    "n, k, d",
    [(N, K, D), (1000, 4099, 512), (1000, 4099, 1000)],
    ids=["adclr", "wide-512", "wide-1000"],
)
def test_against_reference(n, k, d, dtype, given_logits):
    """ADCLR's size, and rows wider than 256, which go through the kernels in 256-wide chunks
    (a ragged last one at 1000): at D = 1024 in fp32 whole rows would need 394 KB of shared
    memory per block."""
    (x, w, teacher, teacher_weight, center, grad), ref, exact = problem(n, k, d, given_logits)
    ops = kernels()
    args = [
        x.to(dtype),
        w.to(dtype),
        teacher.to(dtype),
        None if teacher_weight is None else teacher_weight.to(dtype),
        center,
    ]
    out = ops.linear_soft_ce(*args, TAU_S, TAU_T)
    grads = ops.linear_soft_ce_backward(grad, *args, out[1], out[2], TAU_S, TAU_T)
    assert_outputs(out, ref[:4], exact[:4])
    assert_grads(grads, ref[4:], exact[4:], dtype)


def test_forward_is_deterministic():
    (x, w, teacher, teacher_weight, center, grad), _, _ = adclr_case(False)
    ops = kernels()
    args = [t.to(torch.bfloat16) for t in (x, w, teacher, teacher_weight)] + [center]
    first, again = ops.linear_soft_ce(*args, TAU_S, TAU_T), ops.linear_soft_ce(*args, TAU_S, TAU_T)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    grads = [
        ops.linear_soft_ce_backward(grad, *args, first[1], first[2], TAU_S, TAU_T) for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # no atomics in the backward either


def test_public_op_dispatches_to_triton_and_saves_memory():
    """``auto`` runs Triton on CUDA; the loss and gradients obey the rule against
    backend="torch", and the fused op's peak extra memory stays far below one fp32 N x K."""
    (x0, w0, teacher, teacher_weight, center, _), _, _ = adclr_case(False)
    results, peaks = [], []
    for dtype, backend in (
        (torch.bfloat16, "auto"),
        (torch.bfloat16, "torch"),
        (torch.float64, "torch"),
    ):
        x, w = leaf(x0, dtype), leaf(w0, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, mean = linear_soft_ce(
            x,
            w,
            teacher.to(dtype),
            teacher_weight.to(dtype),
            center=center,
            teacher_temperature=TAU_T,
            backend=backend,
        )
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        results.append((loss, mean, x.grad, w.grad))
    (fast_loss, fast_mean, *fast), (ref_loss, ref_mean, *ref), (ex_loss, ex_mean, *ex) = results
    assert_close_to_exact(fast_loss, ref_loss, ex_loss, 2.0**-16 * 32 * ex_loss.abs())
    assert_close_to_exact(fast_mean, ref_mean, ex_mean, 2.0**-16 * ex_mean.abs().max())
    assert_grads(fast, [r.float() for r in ref], ex, torch.bfloat16)
    logits_fp32 = N * K * 4
    assert peaks[0] < logits_fp32 / 10, (peaks[0], logits_fp32)
