"""``info_nce`` on the Triton backend (through the interpreter on CPU) against the torch reference.

Every comparison follows the tolerance rule (docs/methods.md §7):
``|triton - exact| <= |torch - exact| + tol``, with
``torch`` the reference backend on the same inputs and ``exact`` the reference in fp64 on those
inputs, for the loss and both gradients, in fp32 and fp16 (inputs rounded to fp16 first, so that
all three see the same values; bf16 is left to tests/gpu: the interpreter multiplies its bit
patterns). ``small_blocks`` shrinks the tiles to 16 so that every size above 16 spans several
tiles with a ragged last one.

The ``test_fp16_*`` tests aim at what differs by dtype: the fp32 tile of ``softmax - target`` is
rounded to fp16 before the second dot, the row gradients are kept out of that tile (or rescaled
to ``|g| <= 1``) so that a tiny upstream gradient cannot flush it, softmax entries below fp16's
smallest normal stay subnormal, and logits of 1 / tau = 20 stay in fp32.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _helpers import (
    INTERPRETER_DTYPES,
    assert_close_to_exact,
    info_nce_op,
    l2n,
    leaf,
    rand,
    requires_triton,
)
from benchmarks.gpu_check.rule import GRAD_SLACK, representable, ulp_tol, unit_rows
from mgc_kernels._dtypes import accumulate

# Slack on top of the reference's own error, in units of the inherent fp32 error scale: with
# L = max |logit| + log(keys) bounding |logit| and |lse|, a loss row is good to about eps * L and
# a gradient entry to about eps * L * |g| * max|x| / tau; two fp32 implementations differ by a
# few of those, plus one ulp of the output itself (they may round to different neighbours).
REL_TOL = 1e-6

pytestmark = requires_triton


def small_blocks(enabled: bool = True):
    """Tiles of 16 rows and 16 keys (the smallest ``tl.dot`` takes)."""
    import mgc_kernels.triton.tiles as plans

    return tiles(16) if enabled else tiles(plans.MAX_ROWS, plans.MAX_COLS)


def tiles(rows: int, cols: int | None = None):
    """Tiles of at most ``rows`` own rows and ``cols`` looped-over rows. Large ones keep runs
    over thousands of keys quick in the interpreter, whose cost is per operation, not per
    element (and which has no register file to fit)."""
    import mgc_kernels.triton.tiles as plans

    return mock.patch.multiple(plans, MAX_ROWS=rows, MAX_COLS=cols or rows)


def autotuned(rows: int = 32, cols: int = 16, band_rows: int = 16):
    """CUDA's launch path, through Triton's autotuner, on the CPU: one candidate (so nothing is
    timed) of ``rows x cols`` tiles, band groups of ``band_rows`` (two per block by default)."""
    import mgc_kernels.triton.tiles as plans

    return mock.patch.multiple(
        plans, TUNED=((rows, cols, 4, 1),), TUNED_BAND_R=band_rows, tunes=lambda *args: True
    )


def run(backend, dtype, q0, k0, targets, queue=None, cot=None, **kwargs):
    q, k = leaf(q0, dtype), leaf(k0, dtype)
    loss = mk.info_nce(
        q, k, targets, queue=None if queue is None else queue.to(dtype), backend=backend, **kwargs
    )
    dq, dk = torch.autograd.grad(loss, (q, k), None if cot is None else cot.to(loss.dtype))
    return loss, dq, dk


def tile_rounding(name, dtype, g, x_over_tau):
    """What rounding the fp32 softmax tile to a 16-bit dtype before the second dot may cost a
    gradient entry: ``u * g_i * sum_j p_ij |x_j| / tau``, so ``u`` times the largest row gradient
    (dq) or their sum (dk: a key gathers every row's share) times ``x_over_tau``; with
    ``GRAD_SLACK`` for ``u``, as tests/gpu. fp32 tiles are not rounded."""
    if dtype == torch.float32:
        return 0.0
    return GRAD_SLACK[dtype] * (g.max() if name == "dq" else g.sum()).item() * x_over_tau


def assert_obeys_rule(
    fast, ref, exact, logit_scale, x_over_tau, weights, reduction, cot, dtype=torch.float32
):
    """``(loss, dq, dk)`` of Triton against the reference's and the exact ones, the gradients in
    ``dtype``. ``weights`` are the row weights of the reduction (0 for rows without a target),
    ``cot`` the cotangent of ``reduction="none"``, ``logit_scale`` and ``x_over_tau`` come from
    ``error_scales``."""
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1e-30)
    loss_scale = (weights.max() if reduction == "none" else weights.sum()).item()
    g = weights if cot is None else weights * cot  # each row's cross-entropy gradient
    for name, f, r, e in zip(("loss", "dq", "dk"), fast, ref, exact):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        if name == "loss":
            tol = REL_TOL * max(1.0, logit_scale) * loss_scale + ulp_tol(e, torch.float32)
        else:
            scale = e.abs().max().item() + g.max().item() * x_over_tau
            tol = (
                REL_TOL * max(1.0, logit_scale) * scale
                + ulp_tol(e, dtype)
                + tile_rounding(name, dtype, g, x_over_tau)
            )
        assert_close_to_exact(f, r, e, tol + 1e-12)


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
    return (
        torch.rand(n, generator=torch.Generator().manual_seed(seed))
        if reduction == "none"
        else None
    )


def check(
    q0,
    k0,
    targets,
    queue=None,
    reduction="mean",
    seed=0,
    temperature=0.1,
    row_weights=None,
    normalize=True,
    dtype=torch.float32,
):
    """Triton's loss, dq and dk on inputs in ``dtype`` obey the tolerance rule (the fp32 inputs
    are rounded to ``dtype`` first, so the exact run sees the same values); returns Triton's
    three tensors."""
    q0, k0 = q0.to(dtype).float(), k0.to(dtype).float()
    queue = None if queue is None else queue.to(dtype).float()
    cot = cotangent(len(q0), reduction, seed)
    args = (q0, k0, targets, queue, cot)
    kwargs = dict(
        reduction=reduction, temperature=temperature, row_weights=row_weights, normalize=normalize
    )
    fast = run("triton", dtype, *args, **kwargs)
    ref = run("torch", dtype, *args, **kwargs)
    exact = run("torch", torch.float64, *args, **kwargs)
    has_target = (
        torch.ones(len(q0))
        if isinstance(targets, torch.Tensor)
        else (targets[1].sum(1) > 0).float()
    )
    weights = has_target * (1.0 if row_weights is None else row_weights)
    keys = [k0] if queue is None else [k0, queue]
    assert_obeys_rule(
        fast,
        ref,
        exact,
        *error_scales(q0, keys, normalize, temperature),
        weights,
        reduction,
        cot,
        dtype,
    )
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


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@given(
    n=SIZES,
    m=SIZES,
    nq=st.sampled_from([0, 1, 17, 40]),
    d=st.sampled_from([1, 3, 16]),
    p=st.sampled_from([0, 1, 3]),
    normalize=st.booleans(),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    temperature=st.sampled_from([0.05, 0.1, 0.5, 1.0]),
    small=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_against_reference(
    dtype, n, m, nq, d, p, normalize, weighted, reduction, temperature, small, seed
):
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 if normalize else 0.5
    q0 = rand(gen, n, d, dtype=torch.float32, scale=scale)
    k0 = rand(gen, m, d, dtype=torch.float32, scale=scale)
    queue = rand(gen, nq, d, dtype=torch.float32, scale=scale) if nq else None
    targets = torch.randint(0, m, (n,), generator=gen) if p == 0 else soft_targets(gen, n, m, p)
    row_weights = torch.rand(n, generator=gen) if weighted else None
    with small_blocks(small):
        check(
            q0,
            k0,
            targets,
            queue,
            reduction,
            seed,
            temperature=temperature,
            row_weights=row_weights,
            normalize=normalize,
            dtype=dtype,
        )


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_autotuned_launch_path(dtype):
    """The launch CUDA takes (autotuner, grid from the chosen tiles, a block's band the union of
    its groups'), with near-diagonal targets, so that the two groups of a block have different
    bands."""
    gen = torch.Generator().manual_seed(9)
    q0, k0, u0 = (rand(gen, n, 16, dtype=torch.float32) for n in (70, 90, 20))
    index = torch.stack([torch.arange(70), torch.arange(70) + 10], 1)
    weight = torch.rand(70, 2, generator=gen) + 0.1
    weight[5] = 0  # a row without a target
    with autotuned():
        check(q0, k0, (index, weight), u0, seed=9, dtype=dtype)


# --------------------------------------------------------------------------- the op itself


def op_results(dtype, q, k, queue, index, weight, grad, temperature, grad_lse=None):
    """``(row_loss, lse, dq, dk)`` of the op itself (no public API, so the saved lse and an LSE
    gradient are reachable; ``dq`` from the forward's ``v`` as the op's autograd forms it):
    Triton's on the inputs rounded to ``dtype``, then the reference's on
    the same values in fp32 (for 16-bit inputs: its result before the final rounding) and in
    fp64 (exact)."""
    from mgc_kernels.reference import info_nce as reference
    from mgc_kernels.triton import info_nce as kernels

    results = []
    for ops, dt in ((kernels, dtype), (reference, torch.float32), (reference, torch.float64)):
        acc = accumulate(dt)
        x, y = q.to(dtype).to(dt), k.to(dtype).to(dt)
        u = None if queue is None else queue.to(dtype).to(dt)
        results.append(
            info_nce_op(ops, x, y, u, index, weight.to(acc), grad, temperature, grad_lse)
        )
    return results


def assert_op_results(dtype, fast, ref, exact, temperature, outputs=2):
    """``op_results`` by the rule: the fp32 accumulation error (``|logit| <= 1 / tau`` for unit
    rows) and one ulp of the output's dtype, plus for 16-bit gradients the rounding of the
    softmax tile (``GRAD_SLACK * max|exact|``, as ``assert_grads``). The first ``outputs``
    results are the forward's fp32 ones, the last two dq and dk in ``dtype``."""
    for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
        forward = i < outputs
        out = torch.float32 if forward else dtype
        assert f.dtype == out and f.shape == e.shape and torch.isfinite(f).all()
        # a row loss is lse - logit, each ~ 1 / tau: its fp32 error does not shrink with it
        scale = max(1.0, e.abs().max().item()) if forward else e.abs().max().item()
        tol = REL_TOL / temperature * scale + ulp_tol(e, out)
        if out != torch.float32:
            tol = tol + GRAD_SLACK[out] * e.abs().max()
        assert_close_to_exact(f, r.to(out), e, tol)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("small", [True, False])
def test_op_outputs_and_saved_lse_match_reference(small, dtype):
    """The op's own outputs: row losses, the saved lse (hidden by the public API) and the
    gradients for an arbitrary upstream gradient of the row losses and of the lse, with a queue
    whose length is not a multiple of the tile."""
    gen = torch.Generator().manual_seed(1)
    n, m, nq, d = 35, 18, 41, 13
    q, k, u = (
        torch.nn.functional.normalize(rand(gen, r, d, dtype=torch.float32), dim=1)
        for r in (n, m, nq)
    )
    index, weight = soft_targets(gen, n, m, 4)
    weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-30)
    grad, grad_lse = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    with small_blocks(small):
        fast, ref, exact = op_results(dtype, q, k, u, index, weight, grad, 0.07, grad_lse)
    assert_op_results(dtype, fast, ref, exact, 0.07)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_rows_without_target_and_zero_row_weight_get_no_gradient(dtype):
    gen = torch.Generator().manual_seed(2)
    q0, k0 = rand(gen, 20, 8, dtype=torch.float32), rand(gen, 19, 8, dtype=torch.float32)
    index, weight = soft_targets(gen, 20, 19, 2)
    weight[3] = 0  # no target
    row_weights = torch.rand(20, generator=gen)
    row_weights[5] = 0
    with small_blocks():
        _, dq, _ = check(q0, k0, (index, weight), row_weights=row_weights, dtype=dtype)
    assert torch.count_nonzero(dq[3]) == 0 and torch.count_nonzero(dq[5]) == 0


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_empty_queue_equals_no_queue(dtype):
    gen = torch.Generator().manual_seed(3)
    q0, k0 = rand(gen, 17, 5, dtype=torch.float32), rand(gen, 18, 5, dtype=torch.float32)
    t = torch.randint(0, 18, (17,), generator=gen)
    without = run("triton", dtype, q0, k0, t)
    empty = run("triton", dtype, q0, k0, t, torch.empty(0, 5))
    for a, b in zip(without, empty):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_large_logits_are_max_shifted_across_tiles(dtype):
    """Unnormalised inputs at a low temperature give logits of several hundred (exp overflows
    fp32 without the running max); the largest of a row sits in various tiles, queue included."""
    gen = torch.Generator().manual_seed(4)
    q0, k0, u0 = (rand(gen, r, 16, dtype=torch.float32, scale=3.0) for r in (33, 35, 37))
    index, weight = soft_targets(gen, 33, 35, 2)
    with small_blocks():
        loss, dq, dk = check(
            q0, k0, (index, weight), u0, "none", temperature=0.05, normalize=False, dtype=dtype
        )
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


# --------------------------------------------------------------------------- fp16 paths


def confident_rows(gen, n, d, temperature):
    """Unit rows with ``q_i = k_i`` and key ``i`` the target of row ``i``: at tau = 0.1 and
    D = 128 every row's softmax sits on its target (``1 - p_ii`` ~ 2e-3)."""
    k = unit_rows(gen, n, d)
    index = torch.arange(n)[:, None]
    p_target = torch.softmax(k.double() @ k.double().T / temperature, 1).diagonal()
    assert (1 - p_target).max() < 0.01
    return k.clone(), k, index, torch.ones(n, 1)


def test_fp16_softmax_minus_target_of_confident_rows():
    """A row whose softmax sits on its target has the small gradient ``p - t``: formed in fp32
    before the tile is rounded to fp16, it keeps fp16's relative accuracy; rounding ``p ~ 1``
    first costs up to 2**-12 ~ 2.4e-4 against ``1 - p`` ~ 2e-3."""
    gen = torch.Generator().manual_seed(10)
    q, k, index, weight = confident_rows(gen, 32, 128, 0.1)
    grad = torch.ones(32)
    assert_op_results(
        torch.float16, *op_results(torch.float16, q, k, None, index, weight, grad, 0.1), 0.1
    )


@pytest.mark.parametrize("through", ["row_loss", "lse"])
def test_fp16_tiny_upstream_gradient_is_not_flushed(through):
    """An upstream gradient of ~1e-6 (a small loss weight, a mean over many rows): ``p * g`` would
    fall below fp16's smallest subnormal 6e-8 in the tile, so the dk kernel folds the row
    gradients in scaled to ``|g| <= 1`` (and multiplies by ``max |g|`` after the dot), the dq
    kernel applies ``g`` after the dot, and an LSE gradient (MoCo's ``"paired"`` form uses only
    that) is rescaled per row with it. The gradients come out scaled by 1e-6, by the rule."""
    gen = torch.Generator().manual_seed(11)
    n, m, nq = 40, 36, 50
    q, k, u = unit_rows(gen, n, 32), unit_rows(gen, m, 32), unit_rows(gen, nq, 32)
    g = (0.5 + torch.rand(n, generator=gen)) * 1e-6
    if through == "row_loss":
        index, weight = soft_targets(gen, n, m, 2)
        weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-30)
        grad, grad_lse = g, None
    else:  # no targets: the negatives' lse alone, as info_nce(targets="paired") uses it
        index, weight = torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0)
        grad, grad_lse = torch.zeros(n), g
    fast, ref, exact = op_results(torch.float16, q, k, u, index, weight, grad, 0.1, grad_lse)
    assert_op_results(torch.float16, fast, ref, exact, 0.1)
    assert exact[3].abs().max() < 1e-4  # gradients of this size: softmax tiles times g underflow


def test_fp16_subnormal_softmax_tiles():
    """20480 keys close to one direction at tau = 0.05: in every row, keys holding over 30 % of
    the softmax mass have entries below fp16's smallest normal 6.1e-5, and as they share a
    direction their sum is no noise. The tiles keep them as fp16 subnormals (flushing them to zero
    would drop that share of the softmax term)."""
    gen = torch.Generator().manual_seed(12)
    n, m, temperature = 16, 20480, 0.05
    shared = l2n(torch.randn(1, 16, generator=gen))
    k = representable(l2n(shared + 0.05 * torch.randn(m, 16, generator=gen)))
    q = unit_rows(gen, n, 16)
    index = torch.randint(0, m, (n, 1), generator=gen)
    p = torch.softmax(q.double() @ k.double().T / temperature, 1)
    assert (p * (p < 2.0**-14)).sum(1).min() > 0.3
    with tiles(1024):
        fast, ref, exact = op_results(
            torch.float16, q, k, None, index, torch.ones(n, 1), torch.ones(n), temperature
        )
    assert_op_results(torch.float16, fast, ref, exact, temperature)


def test_fp16_logits_of_one_over_tau_stay_in_fp32():
    """Unit rows at tau = 0.05: logits reach 20 and exp(20) = 4.9e8 overflows fp16 (max 65504),
    and a logit of 20 rounded to fp16 is off by up to 2**-7 (about 0.8 % of its softmax entry).
    Logits, shifts and exponentials stay in fp32; only the shifted softmax tile is rounded."""
    gen = torch.Generator().manual_seed(13)
    n, m, nq, temperature = 33, 40, 37, 0.05
    k, u = unit_rows(gen, m, 16), unit_rows(gen, nq, 16)
    q = torch.cat([k[:20], unit_rows(gen, n - 20, 16)])  # rows 0..19 meet their own key
    index, weight = soft_targets(gen, n, m, 2)
    weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-30)
    assert (q.double() @ k.double().T).max() / temperature > 19.9
    with small_blocks():
        fast, ref, exact = op_results(
            torch.float16, q, k, u, index, weight, torch.ones(n), temperature
        )
    assert_op_results(torch.float16, fast, ref, exact, temperature)


# the interpreter warns where the masked-out padding of a tile overflows
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("keys", [1, 17])
def test_fp16_rows_whose_logits_are_all_below_minus_11(keys):
    """Unit rows at tau = 0.05 whose keys all point away (logits about -17 to -20): finite
    gradients, by the rule."""
    q = torch.zeros(3, 16)
    q[:, 0] = 1
    k = torch.zeros(keys, 16)
    k[:, 0], k[:, 1] = -1.0, torch.linspace(0, 0.5, keys)
    k = representable(l2n(k))
    index, weight = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    fast, ref, exact = op_results(torch.float16, q, k, None, index, weight, torch.ones(3), 0.05)
    assert exact[1].max() < -11.1
    assert_op_results(torch.float16, fast, ref, exact, 0.05)
