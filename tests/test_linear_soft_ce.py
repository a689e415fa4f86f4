"""``linear_soft_ce`` on the torch reference: against the formula written out here with
materialised logits in fp64, both teacher forms, centre, temperatures, reductions, teacher mean,
gradcheck, row chunking, input errors, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_compile_matches_eager, leaf, rand
from mgc_kernels.ops.linear_soft_ce import linear_soft_ce
from mgc_kernels.reference import linear_soft_ce as reference


def direct(x, w, teacher, teacher_weight, center, tau_s, tau_t):
    """Per-row CE and the teacher mean, with every logit materialised."""
    logits = teacher if teacher_weight is None else teacher @ teacher_weight.T
    centred = logits if center is None else logits - center
    t = F.softmax(centred / tau_t, dim=1)
    ce = -(t * F.log_softmax(x @ w.T / tau_s, dim=1)).sum(1)
    return ce, logits.mean(0)


def problem(gen, n=9, k=13, d=6, dt=5, dtype=torch.float64):
    return (
        rand(gen, n, d, dtype=dtype),
        rand(gen, k, d, dtype=dtype, scale=0.5),
        rand(gen, n, dt, dtype=dtype),
        rand(gen, k, dt, dtype=dtype),
    )


@pytest.mark.parametrize("given_logits", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.5, 0.07), (1.0, 2.0)])
def test_equals_direct_formula(given_logits, with_center, reduction, temps):
    gen = torch.Generator().manual_seed(0)
    x0, w0, y, v = problem(gen)
    center = rand(gen, 13) if with_center else None
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)
    x, w = leaf(x0), leaf(w0)
    loss, mean = linear_soft_ce(
        x,
        w,
        teacher,
        teacher_weight,
        student_temperature=temps[0],
        teacher_temperature=temps[1],
        center=center,
        reduction=reduction,
    )
    xe, we = leaf(x0), leaf(w0)
    ce, want_mean = direct(xe, we, y, v, center, *temps)
    want = {"mean": ce.mean(), "sum": ce.sum(), "none": ce}[reduction]
    assert loss.dtype == torch.float64 and mean.dtype == torch.float64
    assert loss.shape == want.shape and mean.shape == (13,)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    assert not mean.requires_grad
    cot = torch.rand(want.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(loss, (x, w), cot)
    exp = torch.autograd.grad(want, (xe, we), cot)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_gradient_is_softmax_minus_teacher_over_tau():
    gen = torch.Generator().manual_seed(1)
    x0, w0, y, v = problem(gen)
    center = rand(gen, 13)
    x, w = leaf(x0), leaf(w0)
    loss, _ = linear_soft_ce(x, w, y, v, center=center, reduction="sum")
    loss.backward()
    ds = (F.softmax(x0 @ w0.T / 0.1, 1) - F.softmax((y @ v.T - center) / 0.04, 1)) / 0.1
    torch.testing.assert_close(x.grad, ds @ w0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ds.T @ x0, rtol=1e-10, atol=1e-12)


def test_no_gradient_to_teacher_or_center():
    gen = torch.Generator().manual_seed(2)
    x0, w0, y0, v0 = problem(gen)
    x, w, y, v, c = leaf(x0), leaf(w0), leaf(y0), leaf(v0), leaf(rand(gen, 13))
    loss, mean = linear_soft_ce(x, w, y, v, center=c)
    loss.backward()
    assert y.grad is None and v.grad is None and c.grad is None
    assert x.grad is not None and w.grad is not None and not mean.requires_grad


def test_teacher_equal_to_student_distribution_gives_entropy_and_zero_gradient():
    """With the teacher logits = student logits at equal temperatures, CE is the entropy and
    the gradient (softmax - t) vanishes."""
    gen = torch.Generator().manual_seed(3)
    x0, w0, _, _ = problem(gen)
    x, w = leaf(x0), leaf(w0)
    loss, _ = linear_soft_ce(
        x, w, x0, w0, student_temperature=0.3, teacher_temperature=0.3, reduction="none"
    )
    p = F.softmax(x0 @ w0.T / 0.3, 1)
    torch.testing.assert_close(loss, -(p * p.log()).sum(1), rtol=1e-12, atol=1e-12)
    loss.sum().backward()
    assert x.grad.abs().max() < 1e-12 and w.grad.abs().max() < 1e-12


def test_extreme_logits_are_finite():
    gen = torch.Generator().manual_seed(4)
    x0, w0, y, v = problem(gen, dtype=torch.float32)
    x, w = leaf(x0 * 30), leaf(w0 * 30)
    loss, mean = linear_soft_ce(
        x, w, y * 30, v * 30, student_temperature=0.01, teacher_temperature=0.01, reduction="none"
    )
    loss.sum().backward()
    assert all(torch.isfinite(t).all() for t in (loss, mean, x.grad, w.grad))
    ce, _ = direct(
        x0.double() * 30, w0.double() * 30, y.double() * 30, v.double() * 30, None, 0.01, 0.01
    )
    torch.testing.assert_close(loss.double(), ce, rtol=1e-4, atol=1e-2)


# --------------------------------------------------------------------------- fp64 / chunks


@pytest.mark.parametrize("given_logits", [False, True])
def test_gradcheck_fp64(given_logits):
    gen = torch.Generator().manual_seed(5)
    x0, w0, y, v = problem(gen, n=4, k=5, d=3, dt=3)
    center = rand(gen, 5)
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)

    def f(x, w):
        return linear_soft_ce(
            x,
            w,
            teacher,
            teacher_weight,
            center=center,
            student_temperature=0.5,
            teacher_temperature=0.3,
        )[0]

    assert torch.autograd.gradcheck(f, (leaf(x0), leaf(w0)), eps=1e-6, atol=1e-5, rtol=1e-4)

    def g(x, w):
        return linear_soft_ce(
            x,
            w,
            teacher,
            teacher_weight,
            center=center,
            reduction="none",
            student_temperature=0.5,
            teacher_temperature=0.3,
        )[0]

    assert torch.autograd.gradcheck(g, (leaf(x0), leaf(w0)), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n,k,chunk", [(7, 3, 7), (9, 2, 7), (5, 4, 7), (7, 3, 1)])
@pytest.mark.parametrize("given_logits", [False, True])
def test_chunked_equals_unchunked(monkeypatch, n, k, chunk, given_logits):
    gen = torch.Generator().manual_seed(6 + n + k)
    x0, w0, y, v = problem(gen, n=n, k=k, dtype=torch.float32)
    center = rand(gen, k, dtype=torch.float32)
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)
    cot = torch.rand(n, generator=gen)

    def run():
        x, w = leaf(x0), leaf(w0)
        loss, mean = linear_soft_ce(x, w, teacher, teacher_weight, center=center, reduction="none")
        loss.backward(cot)
        return loss.detach(), mean, x.grad, w.grad

    full = run()
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
    sizes = [s.stop - s.start for s in reference.row_chunks(n, k)]
    assert len(sizes) > 1 and sum(sizes) == n
    for a, b in zip(run(), full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_reference_holds_one_chunk_of_logits(monkeypatch):
    """Every logit block the reference builds has at most ``CHUNK_ELEMENTS // K`` rows."""
    gen = torch.Generator().manual_seed(7)
    x0, w0, y, v = problem(gen, n=20, k=6)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 18)  # 3 rows a chunk
    seen = []
    original = reference.chunk_logits

    def spy(*args):
        out = original(*args)
        seen.append(out[0].shape[0])
        return out

    monkeypatch.setattr(reference, "chunk_logits", spy)
    x, w = leaf(x0), leaf(w0)
    linear_soft_ce(x, w, y, v)[0].backward()
    assert max(seen) == 3 and len(seen) == 2 * 7  # forward and backward, 7 chunks each


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_inputs(dtype, tol):
    gen = torch.Generator().manual_seed(8)
    x0, w0, y, v = problem(gen, n=6, k=10, d=16, dt=8)
    x, w = leaf(x0, dtype), leaf(w0, dtype)
    loss, mean = linear_soft_ce(
        x, w, y.to(dtype), v.to(dtype), student_temperature=0.5, teacher_temperature=0.5
    )
    loss.backward()
    assert loss.dtype == torch.float32 and mean.dtype == torch.float32
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    xe, we = leaf(x0), leaf(w0)
    ce, want_mean = direct(xe, we, y, v, None, 0.5, 0.5)
    ce.mean().backward()
    torch.testing.assert_close(loss.double(), ce.mean(), rtol=tol, atol=tol)
    torch.testing.assert_close(mean.double(), want_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), xe.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double(), we.grad, rtol=tol, atol=tol)


def test_fp32_student_with_fp64_teacher_runs_in_fp64():
    gen = torch.Generator().manual_seed(9)
    x0, w0, y, v = problem(gen)
    loss, mean = linear_soft_ce(x0.float(), w0.float(), y, v)
    assert loss.dtype == torch.float64 and mean.dtype == torch.float64


# --------------------------------------------------------------------------- errors


def _kwargs():
    gen = torch.Generator().manual_seed(10)
    x, w, y, v = problem(gen, n=4, k=5, d=3, dt=2, dtype=torch.float32)
    return dict(student=x, student_weight=w, teacher=y, teacher_weight=v)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("student_list", TypeError, "student must be a torch.Tensor"),
        ("student_1d", ValueError, "student must have 2 dimensions"),
        ("student_int", TypeError, "student must have dtype"),
        ("weight_d", ValueError, "student_weight must have size 3 in dimension 1"),
        ("weight_dtype", TypeError, "student_weight must have the dtype of student"),
        ("teacher_rows", ValueError, "teacher must have size 4 in dimension 0"),
        ("teacher_weight_k", ValueError, "teacher_weight must have size 5 in dimension 0"),
        ("teacher_weight_d", ValueError, "teacher_weight must have size 2 in dimension 1"),
        ("teacher_weight_dtype", TypeError, "teacher_weight must have the dtype of teacher"),
        ("logits_shape", ValueError, r"teacher must be \[N, K\] = \[4, 5\]"),
        ("center_shape", ValueError, "center must have size 5"),
        ("center_2d", ValueError, "center must have 1 dimensions"),
        ("empty", ValueError, "at least one row"),
        ("tau_s", ValueError, "student_temperature must be a positive number"),
        ("tau_t", ValueError, "teacher_temperature must be a positive number"),
        ("tau_nan", ValueError, "teacher_temperature must be a positive number"),
        ("reduction", ValueError, "reduction must be one of"),
        ("device", ValueError, "on meta but student is on cpu"),
        ("backend", ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs(case, exc, match):
    kw = _kwargs()
    if case == "student_list":
        kw["student"] = kw["student"].tolist()
    elif case == "student_1d":
        kw["student"] = kw["student"][0]
    elif case == "student_int":
        kw["student"] = kw["student"].long()
    elif case == "weight_d":
        kw["student_weight"] = torch.randn(5, 4)
    elif case == "weight_dtype":
        kw["student_weight"] = kw["student_weight"].double()
    elif case == "teacher_rows":
        kw["teacher"] = torch.randn(3, 2)
    elif case == "teacher_weight_k":
        kw["teacher_weight"] = torch.randn(6, 2)
    elif case == "teacher_weight_d":
        kw["teacher_weight"] = torch.randn(5, 3)
    elif case == "teacher_weight_dtype":
        kw["teacher_weight"] = kw["teacher_weight"].half()
    elif case == "logits_shape":
        kw["teacher_weight"] = None
    elif case == "center_shape":
        kw["center"] = torch.zeros(4)
    elif case == "center_2d":
        kw["center"] = torch.zeros(1, 5)
    elif case == "empty":
        kw["student"], kw["teacher"] = kw["student"][:0], kw["teacher"][:0]
    elif case == "tau_s":
        kw["student_temperature"] = 0
    elif case == "tau_t":
        kw["teacher_temperature"] = -0.04
    elif case == "tau_nan":
        kw["teacher_temperature"] = float("nan")
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "device":
        kw["teacher_weight"] = kw["teacher_weight"].to("meta")
    elif case == "backend":
        kw["backend"] = "cuda"
    with pytest.raises(exc, match=match):
        linear_soft_ce(**kw)


# --------------------------------------------------------------------------- torch.library


def _op_args(dtype, given_logits, with_center):
    gen = torch.Generator().manual_seed(11)
    x, w, y, v = problem(gen, n=5, k=7, d=4, dt=3, dtype=dtype)
    teacher, teacher_weight = (y @ v.T, None) if given_logits else (y, v)
    center = rand(gen, 7, dtype=dtype) if with_center else None
    return (
        x.requires_grad_(True),
        w.requires_grad_(True),
        teacher,
        teacher_weight,
        center,
        0.1,
        0.07,
        "torch",
    )


@pytest.mark.parametrize("with_center", [True, False])
@pytest.mark.parametrize("given_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype, given_logits, with_center):
    torch.library.opcheck(
        torch.ops.mgc_kernels.linear_soft_ce.default, _op_args(dtype, given_logits, with_center)
    )


def test_torch_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(12)
    x0, w0, y, v = problem(gen)
    center = rand(gen, 13)

    def f(x, w):
        loss, mean = linear_soft_ce(x, w, y, v, center=center, teacher_temperature=0.05)
        return loss + 0 * mean.sum()

    assert_compile_matches_eager(f, x0, w0)


def test_center_updated_in_place_after_forward_keeps_backward_exact():
    """DINO updates its centre in place right after the forward; the backward must still use
    the centre the forward saw."""
    gen = torch.Generator().manual_seed(13)
    x0, w0, y, v = problem(gen)
    center = rand(gen, 13)
    before = center.clone()
    x, w = leaf(x0), leaf(w0)
    loss, mean = linear_soft_ce(x, w, y, v, center=center)
    center.mul_(0.9).add_(mean, alpha=0.1)
    loss.backward()
    xe, we = leaf(x0), leaf(w0)
    direct(xe, we, y, v, before, 0.1, 0.04)[0].mean().backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, we.grad, rtol=1e-10, atol=1e-12)
