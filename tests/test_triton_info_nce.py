"""``info_nce`` on the Triton backend (through the interpreter on CPU) against the torch reference.

Every comparison follows DESIGN.md's rule: ``|triton - exact| <= |torch - exact| + tol``, with
``torch`` the reference backend on the same fp32 inputs and ``exact`` the reference in fp64 on
those inputs, for the loss and both gradients. Half precision is covered by tests/gpu (the
interpreter does not emulate fp16/bf16 dots). ``small_blocks`` shrinks the tiles to 16 so that
every size above 16 spans several tiles with a ragged last one.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk

try:
    from ._helpers import assert_close_to_exact, leaf, rand, requires_triton
except ImportError:
    from _helpers import assert_close_to_exact, leaf, rand, requires_triton

# Slack on top of the reference's own error, in units of the inherent fp32 error scale: with
# L = max |logit| + log(keys) bounding |logit| and |lse|, a loss row is good to about eps * L and
# a gradient entry to about eps * L * |g| * max|x| / tau; two fp32 implementations differ by a
# few of those, plus one ulp of the output itself (they may round to different neighbours).
REL_TOL = 1e-6

pytestmark = requires_triton


def small_blocks(enabled: bool = True):
    """Tiles of 16 rows and 16 keys (the smallest ``tl.dot`` takes)."""
    import mgc_kernels.triton.info_nce as kernels

    return mock.patch.multiple(kernels, MAX_ROWS=16 if enabled else kernels.MAX_ROWS,
                               MAX_COLS=16 if enabled else kernels.MAX_COLS)


def run(backend, dtype, q0, k0, targets, queue=None, cot=None, **kwargs):
    q, k = leaf(q0, dtype), leaf(k0, dtype)
    loss = mk.info_nce(q, k, targets, queue=None if queue is None else queue.to(dtype),
                       backend=backend, **kwargs)
    dq, dk = torch.autograd.grad(loss, (q, k), None if cot is None else cot.to(loss.dtype))
    return loss, dq, dk


def assert_obeys_rule(fast, ref, exact, logit_scale, x_over_tau, weights, reduction, cot):
    """``(loss, dq, dk)`` of Triton against the reference's and the exact ones. ``weights`` are
    the row weights of the reduction (0 for rows without a target), ``cot`` the cotangent of
    ``reduction="none"``, ``logit_scale`` and ``x_over_tau`` come from ``error_scales``."""
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1e-30)
    loss_scale = (weights.max() if reduction == "none" else weights.sum()).item()
    g = (weights if cot is None else weights * cot).max().item()  # of a row's cross-entropy
    for name, f, r, e in zip(("loss", "dq", "dk"), fast, ref, exact):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        scale = loss_scale if name == "loss" else e.abs().max().item() + g * x_over_tau
        tol = REL_TOL * max(1.0, logit_scale) * scale + 2.0**-23 * e.abs() + 1e-12
        assert_close_to_exact(f, r, e, tol)


def error_scales(q0, keys, normalize, temperature):
    """``(max |logit| + log(keys), largest row norm / tau)`` for ``assert_obeys_rule`` from the
    raw inputs (``keys``: a list of key matrices). The normalisation's backward divides by the raw
    row norm, so the latter is scaled by 1 / (smallest raw norm) when normalising."""
    rows = [x.double() for x in [q0, *keys] if len(x)]
    amplify = min(x.norm(dim=1).min().item() for x in rows) if normalize else 1.0
    if normalize:
        rows = [torch.nn.functional.normalize(x, dim=1) for x in rows]
    keys = torch.cat(rows[1:])
    logit_scale = (rows[0] @ keys.T).abs().max().item() / temperature + math.log(len(keys))
    return logit_scale, max(x.norm(dim=1).max().item() for x in rows) / temperature / amplify


def cotangent(n, reduction, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) if reduction == "none" \
        else None


def check(q0, k0, targets, queue=None, reduction="mean", seed=0, temperature=0.1,
          row_weights=None, normalize=True):
    """Triton's loss, dq and dk obey the tolerance rule; returns Triton's three tensors."""
    cot = cotangent(len(q0), reduction, seed)
    args = (q0, k0, targets, queue, cot)
    kwargs = dict(reduction=reduction, temperature=temperature, row_weights=row_weights,
                  normalize=normalize)
    fast = run("triton", torch.float32, *args, **kwargs)
    ref = run("torch", torch.float32, *args, **kwargs)
    exact = run("torch", torch.float64, *args, **kwargs)
    has_target = torch.ones(len(q0)) if isinstance(targets, torch.Tensor) \
        else (targets[1].sum(1) > 0).float()
    weights = has_target * (1.0 if row_weights is None else row_weights)
    keys = [k0] if queue is None else [k0, queue]
    assert_obeys_rule(fast, ref, exact, *error_scales(q0, keys, normalize, temperature),
                      weights, reduction, cot)
    return fast


def soft_targets(gen, n, m, p):
    """``(index, weight)`` with duplicate indices, zero-weight padding and rows without any
    target (row 0 always has one)."""
    index = torch.randint(0, m, (n, p), generator=gen)
    index[::2, -1] = index[::2, 0]  # duplicates: their weights add up
    weight = torch.rand(n, p, generator=gen) * 3
    weight[torch.rand(n, p, generator=gen) < 0.3] = 0
    weight[0, 0] = 1.0
    return index, weight


# --------------------------------------------------------------------------- hypothesis

SIZES = st.sampled_from([1, 3, 17, 33])


@given(n=SIZES, m=SIZES, nq=st.sampled_from([0, 1, 17, 40]), d=st.sampled_from([1, 3, 16]),
       p=st.sampled_from([0, 1, 3]), normalize=st.booleans(), weighted=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       temperature=st.sampled_from([0.05, 0.1, 0.5, 1.0]), small=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_random_against_reference(n, m, nq, d, p, normalize, weighted, reduction, temperature,
                                  small, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 if normalize else 0.5
    q0 = rand(gen, n, d, dtype=torch.float32, scale=scale)
    k0 = rand(gen, m, d, dtype=torch.float32, scale=scale)
    queue = rand(gen, nq, d, dtype=torch.float32, scale=scale) if nq else None
    targets = torch.randint(0, m, (n,), generator=gen) if p == 0 else soft_targets(gen, n, m, p)
    row_weights = torch.rand(n, generator=gen) if weighted else None
    with small_blocks(small):
        check(q0, k0, targets, queue, reduction, seed, temperature=temperature,
              row_weights=row_weights, normalize=normalize)


# --------------------------------------------------------------------------- the op itself


@pytest.mark.parametrize("small", [True, False])
def test_op_outputs_and_saved_lse_match_reference(small):
    """The op's own outputs: row losses, the saved lse (hidden by the public API) and the
    gradients for an arbitrary upstream gradient, with a queue whose length is not a multiple
    of the tile."""
    from mgc_kernels.reference import info_nce as reference
    from mgc_kernels.triton import info_nce as kernels

    gen = torch.Generator().manual_seed(1)
    n, m, nq, d = 35, 18, 41, 13
    q, k, u = (torch.nn.functional.normalize(rand(gen, r, d, dtype=torch.float32), dim=1)
               for r in (n, m, nq))
    index, weight = soft_targets(gen, n, m, 4)
    weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-30)
    grad = torch.randn(n, generator=gen)
    with small_blocks(small):
        got = kernels.info_nce(q, k, u, index, weight, 0.07)
        got_grads = kernels.info_nce_backward(grad, q, k, u, index, weight, got[1], 0.07)
    args64 = [x.double() for x in (q, k, u)] + [index, weight.double()]
    want = reference.info_nce(q, k, u, index, weight, 0.07)
    exact = reference.info_nce(*args64, 0.07)
    want_grads = reference.info_nce_backward(grad, q, k, u, index, weight, want[1], 0.07)
    exact_grads = reference.info_nce_backward(grad.double(), *args64, exact[1], 0.07)
    for g, w, e in zip(got + got_grads, want + want_grads, exact + exact_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close_to_exact(g, w, e, REL_TOL / 0.07 * e.abs().max().item())  # |logit| <= 1/tau


def test_rows_without_target_and_zero_row_weight_get_no_gradient():
    gen = torch.Generator().manual_seed(2)
    q0, k0 = rand(gen, 20, 8, dtype=torch.float32), rand(gen, 19, 8, dtype=torch.float32)
    index, weight = soft_targets(gen, 20, 19, 2)
    weight[3] = 0  # no target
    row_weights = torch.rand(20, generator=gen)
    row_weights[5] = 0
    with small_blocks():
        _, dq, _ = check(q0, k0, (index, weight), row_weights=row_weights)
    assert torch.count_nonzero(dq[3]) == 0 and torch.count_nonzero(dq[5]) == 0


def test_empty_queue_equals_no_queue():
    gen = torch.Generator().manual_seed(3)
    q0, k0 = rand(gen, 17, 5, dtype=torch.float32), rand(gen, 18, 5, dtype=torch.float32)
    t = torch.randint(0, 18, (17,), generator=gen)
    without = run("triton", torch.float32, q0, k0, t)
    empty = run("triton", torch.float32, q0, k0, t, torch.empty(0, 5))
    for a, b in zip(without, empty):
        assert torch.equal(a, b)


def test_large_logits_are_max_shifted_across_tiles():
    """Unnormalised inputs at a low temperature give logits of several hundred (exp overflows
    fp32 without the running max); the largest of a row sits in various tiles, queue included."""
    gen = torch.Generator().manual_seed(4)
    q0, k0, u0 = (rand(gen, r, 16, dtype=torch.float32, scale=3.0) for r in (33, 35, 37))
    index, weight = soft_targets(gen, 33, 35, 2)
    with small_blocks():
        loss, dq, dk = check(q0, k0, (index, weight), u0, "none", temperature=0.05,
                             normalize=False)
    assert (q0 @ torch.cat([k0, u0]).T / 0.05).abs().max() > 300
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(5)
    q0, k0, u0 = (rand(gen, r, 6, dtype=torch.float32) for r in (9, 7, 5))
    index, weight = soft_targets(gen, 9, 7, 2)
    rw = torch.rand(9, generator=gen)

    def f(q, k):
        return mk.info_nce(q, k, (index, weight), row_weights=rw, queue=u0, backend="triton")

    q, k = leaf(q0), leaf(k0)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k)
    loss.backward()
    want = check(q0, k0, (index, weight), u0, row_weights=rw)
    for got, exp in zip((loss, q.grad, k.grad), want):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
