"""``linear_soft_ce`` on the Triton backend (the interpreter on CPU) against the torch reference,
by DESIGN.md's rule ``|triton - exact| <= |torch - exact| + tol`` (``torch`` the reference on the
same fp32 inputs, ``exact`` the reference in fp64), for the loss, the teacher mean and both
gradients. ``small_blocks`` shrinks the tiles to 16 so that the sizes below span several tiles
with a ragged last one (K not a multiple of the tile); half precision is covered by tests/gpu.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from mgc_kernels.ops.linear_soft_ce import linear_soft_ce

try:
    from ._helpers import assert_close_to_exact, leaf, rand, requires_triton
except ImportError:
    from _helpers import assert_close_to_exact, leaf, rand, requires_triton

pytestmark = requires_triton

# slack per unit of the inherent fp32 error scale (|logit| + log K) of each output
REL_TOL = 2e-6


def small_blocks(enabled: bool = True, programs: int | None = None):
    import mgc_kernels.triton.linear_soft_ce as kernels

    return mock.patch.multiple(kernels, MAX_ROWS=16 if enabled else kernels.MAX_ROWS,
                               MAX_COLS=16 if enabled else kernels.MAX_COLS,
                               MAX_PROGRAMS=programs or kernels.MAX_PROGRAMS)


def run(backend, dtype, x0, w0, teacher, teacher_weight, center, reduction, cot, **kw):
    x, w = leaf(x0, dtype), leaf(w0, dtype)
    loss, mean = linear_soft_ce(x, w, teacher.to(dtype),
                                None if teacher_weight is None else teacher_weight.to(dtype),
                                center=None if center is None else center.to(dtype),
                                reduction=reduction, backend=backend, **kw)
    dx, dw = torch.autograd.grad(loss, (x, w), None if cot is None else cot.to(loss.dtype))
    return loss, mean, dx, dw


def check(x0, w0, teacher, teacher_weight=None, center=None, reduction="mean", seed=0,
          student_temperature=0.1, teacher_temperature=0.04):
    gen = torch.Generator().manual_seed(seed)
    cot = torch.rand(len(x0), generator=gen) if reduction == "none" else None
    args = (x0, w0, teacher, teacher_weight, center, reduction, cot)
    kw = dict(student_temperature=student_temperature, teacher_temperature=teacher_temperature)
    fast = run("triton", torch.float32, *args, **kw)
    ref = run("torch", torch.float32, *args, **kw)
    exact = run("torch", torch.float64, *args, **kw)
    k = len(w0)
    row_g = cot if cot is not None else torch.full((len(x0),), 1.0 / len(x0)
                                                   if reduction == "mean" else 1.0)
    s_scale = (x0.double() @ w0.double().T).abs().max().item() / student_temperature
    raw = teacher.double() if teacher_weight is None else teacher.double() @ teacher_weight.double().T
    t_scale = (raw.abs().max().item() + (0 if center is None else center.abs().max().item())) \
        / teacher_temperature
    logit_scale = s_scale + t_scale + math.log(k)
    for name, f, r, e in zip(("loss", "teacher_mean", "dx", "dw"), fast, ref, exact):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        scale = e.abs().max().item() + (raw.abs().max().item() if name == "teacher_mean" else 0)
        if name == "dx":  # |g_i| |softmax - t| . |w| / tau_s per entry
            scale += row_g.max().item() * w0.abs().max().item() / student_temperature
        if name == "dw":  # summed over rows
            scale += row_g.sum().item() * x0.abs().max().item() / student_temperature
        tol = REL_TOL * max(1.0, logit_scale) * scale + 2.0**-23 * e.abs() + 1e-12
        assert_close_to_exact(f, r, e, tol)
    return fast


def problem(gen, n, k, d, dt, scale=1.0):
    return (rand(gen, n, d, dtype=torch.float32, scale=scale),
            rand(gen, k, d, dtype=torch.float32, scale=0.5 * scale),
            rand(gen, n, dt, dtype=torch.float32), rand(gen, k, dt, dtype=torch.float32))


@pytest.mark.parametrize("n,k,d,dt", [(1, 1, 1, 1), (17, 33, 5, 3), (33, 50, 16, 20),
                                      (40, 17, 13, 16)])
@pytest.mark.parametrize("given_logits", [False, True])
@pytest.mark.parametrize("small", [True, False])
def test_against_reference(n, k, d, dt, given_logits, small):
    gen = torch.Generator().manual_seed(n + k + d)
    x0, w0, y, v = problem(gen, n, k, d, dt)
    center = rand(gen, k, dtype=torch.float32)
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)
    with small_blocks(small):
        check(x0, w0, teacher, teacher_weight, center)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (1.0, 0.5)])
def test_reductions_temperatures_and_no_center(reduction, temps):
    gen = torch.Generator().manual_seed(1)
    x0, w0, y, v = problem(gen, 19, 37, 8, 6)
    with small_blocks():
        check(x0, w0, y, v, None, reduction, student_temperature=temps[0],
              teacher_temperature=temps[1])


def test_more_row_blocks_than_programs():
    """The forward programs loop over several row blocks (and accumulate their own row of the
    teacher column sums) when there are more blocks than ``MAX_PROGRAMS``."""
    gen = torch.Generator().manual_seed(2)
    x0, w0, y, v = problem(gen, 70, 21, 6, 5)  # 5 blocks of 16 rows, 2 programs
    center = rand(gen, 21, dtype=torch.float32)
    with small_blocks(programs=2):
        fast = check(x0, w0, y, v, center, "none")
    with small_blocks():
        again = check(x0, w0, y, v, center, "none")
    torch.testing.assert_close(fast[1], again[1], rtol=1e-6, atol=1e-6)


def test_large_logits_are_max_shifted_across_tiles():
    gen = torch.Generator().manual_seed(3)
    x0, w0, y, v = problem(gen, 33, 49, 16, 16, scale=3.0)
    with small_blocks():
        loss, mean, dx, dw = check(x0, w0, y * 3, v * 3, None, "none",
                                   student_temperature=0.05, teacher_temperature=0.04)
    assert (x0 @ w0.T / 0.05).abs().max() > 100
    assert all(torch.isfinite(t).all() for t in (loss, mean, dx, dw))


def test_op_outputs_and_saved_lse_match_reference():
    """The op's own outputs, the saved student and teacher lse included."""
    from mgc_kernels.reference import linear_soft_ce as reference
    from mgc_kernels.triton import linear_soft_ce as kernels

    gen = torch.Generator().manual_seed(4)
    x, w, y, v = problem(gen, 35, 41, 13, 7)
    c = rand(gen, 41, dtype=torch.float32)
    g = torch.randn(35, generator=gen)
    with small_blocks():
        got = kernels.linear_soft_ce(x, w, y, v, c, 0.1, 0.07)
        got_grads = kernels.linear_soft_ce_backward(g, x, w, y, v, c, got[1], got[2], 0.1, 0.07)
    want = reference.linear_soft_ce(x, w, y, v, c, 0.1, 0.07)
    want_grads = reference.linear_soft_ce_backward(g, x, w, y, v, c, want[1], want[2], 0.1, 0.07)
    a64 = [t.double() for t in (x, w, y, v, c)]
    exact = reference.linear_soft_ce(*a64, 0.1, 0.07)
    exact_grads = reference.linear_soft_ce_backward(g.double(), *a64, exact[1], exact[2], 0.1,
                                                    0.07)
    scale = 200.0  # |logits| / tau bounds here
    for f, r, e in zip(got + got_grads, want + want_grads, exact + exact_grads):
        assert f.dtype == r.dtype and f.shape == r.shape
        assert_close_to_exact(f, r, e, REL_TOL * scale * (e.abs().max().item() + 10))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(5)
    x0, w0, y, v = problem(gen, 9, 21, 6, 5)
    c = rand(gen, 21, dtype=torch.float32)

    def f(x, w):
        loss, mean = linear_soft_ce(x, w, y, v, center=c, backend="triton")
        return loss, mean

    x, w = leaf(x0), leaf(w0)
    loss, mean = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    loss.backward()
    want = check(x0, w0, y, v, c)
    for got, exp in zip((loss, mean, x.grad, w.grad), want):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
