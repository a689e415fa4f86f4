"""``linear_soft_ce`` on the Triton backend (the interpreter on CPU) against the torch reference,
by the tolerance rule (docs/methods.md §7) ``|triton - exact| <= |torch - exact| + tol``
(``torch`` the reference on the same inputs, ``exact`` the reference in fp64), for the loss, the
teacher mean and both gradients, in fp32 and fp16 (inputs rounded to fp16 first; bf16 is left
to tests/gpu: the interpreter multiplies its bit patterns). ``small_blocks`` shrinks the tiles
to 16 so that the sizes below span several tiles with a ragged last one (K not a multiple of the
tile).

The ``test_fp16_*`` tests aim at what differs by dtype: ``p - t`` is formed in fp32 before the
tile is rounded to fp16 for the second dot, the row gradients are applied after the dot (dx) or
folded in scaled to ``|g| <= 1`` (dW), subnormal softmax entries survive the rounding, and
logits over small temperatures (student and given teacher logits) stay in fp32.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from _helpers import (
    INTERPRETER_DTYPES,
    assert_close_to_exact,
    l2n,
    leaf,
    rand,
    requires_triton,
)
from benchmarks.gpu_check.rule import GRAD_SLACK, representable, ulp_tol, unit_rows
from mgc_kernels.ops.linear_soft_ce import linear_soft_ce

pytestmark = requires_triton

# slack per unit of the inherent fp32 error scale (|logit| + log K) of each output
REL_TOL = 2e-6


def small_blocks(enabled: bool = True, programs: int | None = None, size: int = 16):
    """Tiles of ``size`` rows and prototypes (16: the smallest ``tl.dot`` takes; large ones keep
    runs over many prototypes quick in the interpreter, whose cost is per operation)."""
    import mgc_kernels.triton.linear_soft_ce as kernels

    return mock.patch.multiple(
        kernels,
        MAX_ROWS=size if enabled else kernels.MAX_ROWS,
        MAX_COLS=size if enabled else kernels.MAX_COLS,
        MAX_PROGRAMS=programs or kernels.MAX_PROGRAMS,
    )


def run(backend, dtype, x0, w0, teacher, teacher_weight, center, reduction, cot, **kw):
    x, w = leaf(x0, dtype), leaf(w0, dtype)
    loss, mean = linear_soft_ce(
        x,
        w,
        teacher.to(dtype),
        None if teacher_weight is None else teacher_weight.to(dtype),
        center=None if center is None else center.to(dtype),
        reduction=reduction,
        backend=backend,
        **kw,
    )
    dx, dw = torch.autograd.grad(loss, (x, w), None if cot is None else cot.to(loss.dtype))
    return loss, mean, dx, dw


def check(
    x0,
    w0,
    teacher,
    teacher_weight=None,
    center=None,
    reduction="mean",
    seed=0,
    student_temperature=0.1,
    teacher_temperature=0.04,
    dtype=torch.float32,
):
    """Triton's loss, teacher mean, dx and dW on inputs in ``dtype`` obey the tolerance rule
    (the fp32 inputs are rounded to ``dtype`` first, so that the exact run sees the same
    values); returns Triton's four tensors."""
    x0, w0, teacher, teacher_weight, center = (
        None if t is None else t.to(dtype).float()
        for t in (x0, w0, teacher, teacher_weight, center)
    )
    gen = torch.Generator().manual_seed(seed)
    cot = torch.rand(len(x0), generator=gen) if reduction == "none" else None
    args = (x0, w0, teacher, teacher_weight, center, reduction, cot)
    kw = dict(student_temperature=student_temperature, teacher_temperature=teacher_temperature)
    fast = run("triton", dtype, *args, **kw)
    ref = run("torch", dtype, *args, **kw)
    exact = run("torch", torch.float64, *args, **kw)
    k = len(w0)
    row_g = (
        cot
        if cot is not None
        else torch.full((len(x0),), 1.0 / len(x0) if reduction == "mean" else 1.0)
    )
    s_scale = (x0.double() @ w0.double().T).abs().max().item() / student_temperature
    raw = (
        teacher.double() if teacher_weight is None else teacher.double() @ teacher_weight.double().T
    )
    t_scale = (
        raw.abs().max().item() + (0 if center is None else center.abs().max().item())
    ) / teacher_temperature
    logit_scale = s_scale + t_scale + math.log(k)
    for name, f, r, e in zip(("loss", "teacher_mean", "dx", "dw"), fast, ref, exact):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        scale = e.abs().max().item() + (raw.abs().max().item() if name == "teacher_mean" else 0)
        if name == "dx":  # |g_i| |softmax - t| . |w| / tau_s per entry
            scale += row_g.max().item() * w0.abs().max().item() / student_temperature
        if name == "dw":  # summed over rows
            scale += row_g.sum().item() * x0.abs().max().item() / student_temperature
        out = dtype if name in ("dx", "dw") else torch.float32
        tol = REL_TOL * max(1.0, logit_scale) * scale + ulp_tol(e, out) + 1e-12
        if out != torch.float32:  # the fp32 tile p - t rounded to fp16 before the second dot
            tol = tol + GRAD_SLACK[out] * scale
        assert_close_to_exact(f, r, e, tol)
    return fast


def problem(gen, n, k, d, dt, scale=1.0):
    return (
        rand(gen, n, d, dtype=torch.float32, scale=scale),
        rand(gen, k, d, dtype=torch.float32, scale=0.5 * scale),
        rand(gen, n, dt, dtype=torch.float32),
        rand(gen, k, dt, dtype=torch.float32),
    )


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize(
    "n,k,d,dt", [(1, 1, 1, 1), (17, 33, 5, 3), (33, 50, 16, 20), (40, 17, 13, 16)]
)
@pytest.mark.parametrize("given_logits", [False, True])
@pytest.mark.parametrize("small", [True, False])
def test_against_reference(n, k, d, dt, given_logits, small, dtype):
    gen = torch.Generator().manual_seed(n + k + d)
    x0, w0, y, v = problem(gen, n, k, d, dt)
    center = rand(gen, k, dtype=torch.float32)
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)
    with small_blocks(small):
        check(x0, w0, teacher, teacher_weight, center, dtype=dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("n,k,d,dt", [(17, 33, 40, 3), (40, 17, 13, 70), (5, 70, 33, 33)])
@pytest.mark.parametrize("given_logits", [False, True])
def test_wide_rows_walked_in_chunks(n, k, d, dt, given_logits, dtype):
    """Rows wider than ``MAX_RESIDENT_D`` (256; 16 here so that the interpreter stays quick)
    go through the kernels in chunks of that width, a ragged last one included."""
    import mgc_kernels.triton.linear_soft_ce as kernels

    gen = torch.Generator().manual_seed(n + k + d)
    x0, w0, y, v = problem(gen, n, k, d, dt)
    center = rand(gen, k, dtype=torch.float32)
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)
    with mock.patch.object(kernels, "MAX_RESIDENT_D", 16), small_blocks():
        check(x0, w0, teacher, teacher_weight, center, dtype=dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (1.0, 0.5)])
def test_reductions_temperatures_and_no_center(reduction, temps, dtype):
    gen = torch.Generator().manual_seed(1)
    x0, w0, y, v = problem(gen, 19, 37, 8, 6)
    with small_blocks():
        check(
            x0,
            w0,
            y,
            v,
            None,
            reduction,
            student_temperature=temps[0],
            teacher_temperature=temps[1],
            dtype=dtype,
        )


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


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_large_logits_are_max_shifted_across_tiles(dtype):
    gen = torch.Generator().manual_seed(3)
    x0, w0, y, v = problem(gen, 33, 49, 16, 16, scale=3.0)
    with small_blocks():
        loss, mean, dx, dw = check(
            x0,
            w0,
            y * 3,
            v * 3,
            None,
            "none",
            student_temperature=0.05,
            teacher_temperature=0.04,
            dtype=dtype,
        )
    assert (x0 @ w0.T / 0.05).abs().max() > 100
    assert all(torch.isfinite(t).all() for t in (loss, mean, dx, dw))


def op_results(dtype, x, w, y, v, c, grad, tau_s, tau_t):
    """``(row_loss, lse, teacher_lse, teacher_mean, dx, dW)`` of the op itself (the saved lse's
    are hidden by the public API): Triton's on inputs rounded to ``dtype`` (the centre in fp32,
    as the op passes it), then the reference's on the same values in fp32 (for 16-bit inputs:
    its result before the final rounding) and in fp64 (exact); ``v`` None: ``y`` are logits."""
    from mgc_kernels.reference import linear_soft_ce as reference
    from mgc_kernels.triton import linear_soft_ce as kernels

    results = []
    for ops, dt in ((kernels, dtype), (reference, torch.float32), (reference, torch.float64)):
        args = [None if t is None else t.to(dtype).to(dt) for t in (x, w, y, v)]
        args.append(None if c is None else c.to(torch.promote_types(dt, torch.float32)))
        out = ops.linear_soft_ce(*args, tau_s, tau_t)
        grads = ops.linear_soft_ce_backward(
            grad.to(out[0].dtype), *args, out[1], out[2], tau_s, tau_t
        )
        results.append((*out, *grads))
    return results


def assert_op_results(dtype, fast, ref, exact, logit_scale, floor=1.0):
    """``op_results`` by the rule: fp32 accumulation error ``REL_TOL * logit_scale`` per unit of
    the result (plus ``floor`` for the forward's: a loss of 0 is still lse - sum t s, each of
    the logits' size) and one ulp of the output's dtype, plus for 16-bit gradients the rounding
    of the ``p - t`` tile (``GRAD_SLACK * max|exact|``, as ``assert_grads``)."""
    for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
        forward = i < 4  # row_loss, lse, teacher_lse, teacher_mean: fp32
        out = torch.float32 if forward else dtype
        assert f.dtype == out and f.shape == e.shape and torch.isfinite(f).all()
        tol = REL_TOL * logit_scale * (e.abs().max() + (floor if forward else 0.0))
        tol = tol + ulp_tol(e, out)
        if out != torch.float32:
            tol = tol + GRAD_SLACK[out] * e.abs().max()
        assert_close_to_exact(f, r.to(out), e, tol)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_op_outputs_and_saved_lse_match_reference(dtype):
    """The op's own outputs, the saved student and teacher lse included."""
    gen = torch.Generator().manual_seed(4)
    x, w, y, v = problem(gen, 35, 41, 13, 7)
    c = rand(gen, 41, dtype=torch.float32)
    g = torch.randn(35, generator=gen)
    with small_blocks():
        results = op_results(dtype, x, w, y, v, c, g, 0.1, 0.07)
    assert_op_results(dtype, *results, logit_scale=200.0, floor=10.0)  # |logits| / tau <= 200


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


# --------------------------------------------------------------------------- fp16 paths


def prototype_rows(gen, n, k, d=128):
    """Unit prototypes and rows that each equal one of them (row i: prototype i mod k)."""
    w = unit_rows(gen, k, d)
    return w[torch.arange(n) % k].clone(), w


def test_fp16_student_close_to_teacher():
    """Student and teacher both sharp on the same prototype (tau_s = 0.1, tau_t = 0.095): the
    gradient is the small ``p - t`` (about 1e-3 on the top prototype, whose p and t are both
    ~0.998). The kernels form it in fp32 before rounding the tile to fp16; rounding p and t to
    fp16 first would cost up to 2**-12 ~ 2.4e-4 each."""
    gen = torch.Generator().manual_seed(30)
    x, w = prototype_rows(gen, 48, 40)
    p = torch.softmax(x.double() @ w.double().T / 0.1, 1)
    t = torch.softmax(x.double() @ w.double().T / 0.095, 1)
    assert p.max(1).values.min() > 0.99 and (p - t).abs().max() < 2e-3
    results = op_results(torch.float16, x, w, x, w, None, torch.ones(48), 0.1, 0.095)
    assert_op_results(torch.float16, *results, logit_scale=25.0)


@pytest.mark.parametrize("given_logits", [False, True])
def test_fp16_tiny_upstream_gradient_is_not_flushed(given_logits):
    """An upstream gradient of ~1e-6 (a small loss weight, a mean over many rows): ``(p - t) * g``
    falls to fp16's subnormals (a few units of 6e-8) or below, so the dx kernel applies ``g``
    after the dot and the dW kernel folds it in scaled to ``|g| <= 1`` (times ``max |g|`` after
    the dot). 512 rows near one direction against one teacher distribution make dW's sum over
    rows coherent (so its entries are normal in fp16, and a flushed tile shows); the gradients
    come out scaled by 1e-6, by the rule."""
    gen = torch.Generator().manual_seed(31)
    n, k, d = 512, 64, 16
    x = representable(
        l2n(l2n(torch.randn(1, d, generator=gen)) + 0.1 * torch.randn(n, d, generator=gen))
    )
    w, y = unit_rows(gen, k, d), unit_rows(gen, 1, d).repeat(n, 1)
    teacher, teacher_weight = (representable(y @ w.T), None) if given_logits else (y, w)
    g = (0.5 + torch.rand(n, generator=gen)) * 1e-6
    with small_blocks(size=128):
        results = op_results(torch.float16, x, w, teacher, teacher_weight, None, g, 0.1, 0.04)
    assert_op_results(torch.float16, *results, logit_scale=40.0)
    assert results[2][5].abs().max() > 2.0**-14  # dW normal in fp16, its tiles subnormal


def test_fp16_subnormal_softmax_tiles():
    """20480 prototypes close to one direction (DINO has 65536): in every row the student's
    entries below fp16's smallest normal 6.1e-5 hold over 30 % of its mass, and as those
    prototypes share a direction their sum is no noise. The tiles keep them as fp16 subnormals
    (flushing them to zero would drop that share of the gradient)."""
    gen = torch.Generator().manual_seed(32)
    n, k = 16, 20480
    shared = l2n(torch.randn(1, 16, generator=gen))
    w = representable(l2n(shared + 0.05 * torch.randn(k, 16, generator=gen)))
    x, y = unit_rows(gen, n, 16), unit_rows(gen, n, 16)
    p = torch.softmax(x.double() @ w.double().T / 0.05, 1)
    assert (p * (p < 2.0**-14)).sum(1).min() > 0.3
    with small_blocks(size=1024):
        results = op_results(torch.float16, x, w, y, w, None, torch.ones(n), 0.05, 0.04)
    assert_op_results(torch.float16, *results, logit_scale=60.0)


def test_fp16_logits_over_small_temperatures_stay_in_fp32():
    """Student logits reach 1 / tau_s = 20 and given fp16 teacher logits are scaled by
    1 / tau_t = 25: exp(20) overflows fp16, and such logits rounded to fp16 are off by up to
    2**-7 (about 0.8 % of a softmax entry). The kernels upcast the given logits and keep logits,
    shifts and exponentials in fp32; only the shifted ``p - t`` tile is rounded."""
    gen = torch.Generator().manual_seed(33)
    x, w = prototype_rows(gen, 40, 37, 16)
    teacher = representable(unit_rows(gen, 40, 16) @ w.T)
    assert (x.double() @ w.double().T).max() / 0.05 > 19.9
    with small_blocks():
        results = op_results(torch.float16, x, w, teacher, None, None, torch.ones(40), 0.05, 0.04)
    assert_op_results(torch.float16, *results, logit_scale=50.0)


# the interpreter warns where the masked-out padding of a tile overflows
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fp16_teacher_logits_all_below_the_centre():
    """Given teacher logits 0.5 or more below the centre for every one of K = 17 prototypes at
    tau_t = 0.04 (a row unlike the batch's mean): finite gradients, by the rule."""
    gen = torch.Generator().manual_seed(34)
    x, w = unit_rows(gen, 4, 16), unit_rows(gen, 17, 16)
    teacher = representable(torch.linspace(-1.0, -0.5, 17).repeat(4, 1))
    results = op_results(
        torch.float16, x, w, teacher, None, torch.zeros(17), torch.ones(4), 0.1, 0.04
    )
    assert results[2][2].max() < -11.1  # the teacher lse
    assert_op_results(torch.float16, *results, logit_scale=40.0)


# the interpreter warns where the masked-out padding of a tile overflows
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_large_negative_centre_with_a_ragged_last_row_block(dtype):
    """17 rows (a ragged last block of the 16-row tiles) and a centre of -4 on one prototype at
    tau_t = 0.04: finite gradients, by the rule."""
    gen = torch.Generator().manual_seed(35)
    x, y, w = unit_rows(gen, 17, 16), unit_rows(gen, 17, 16), unit_rows(gen, 16, 16)
    c = torch.zeros(16)
    c[3] = -4.0
    with small_blocks():
        results = op_results(dtype, x, w, y, w, c, torch.ones(17), 0.1, 0.04)
    assert_op_results(dtype, *results, logit_scale=150.0)
