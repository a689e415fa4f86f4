"""``mk.info_nce`` against cross-entropy on materialised fp64 logits written out here.

The expected values never use the library's reference helpers: they are built from
``F.cross_entropy`` / ``F.log_softmax`` on explicitly L2-normalised float64 inputs, and the
expected gradients come from autograd through that direct formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mgc_kernels as mk
from _helpers import FP32_TOL, FP64_TOL, assert_compile_matches_eager, l2n, leaf, rand


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 losses for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_targets(index: torch.Tensor, weight: torch.Tensor, cols: int) -> torch.Tensor:
    """``[N, cols]`` fp64 target distributions (rows summing to 1, or all-zero rows)."""
    t = torch.zeros(index.shape[0], cols, dtype=torch.float64)
    t.scatter_add_(1, index.long(), weight.double())
    s = t.sum(1, keepdim=True)
    return torch.where(s > 0, t / torch.where(s > 0, s, 1.0), torch.zeros_like(t))


def expected_loss(
    q,
    k,
    index,
    weight,
    temperature=0.1,
    row_weights=None,
    queue=None,
    normalize=True,
    reduction="mean",
):
    """Direct fp64 formula; ``q``/``k`` may require grad (fp64 leaves), the queue never does."""
    q64, k64 = q.double(), k.double()
    keys = k64 if queue is None else torch.cat([k64, queue.detach().double()])
    if normalize:
        q64 = l2n(q64)
        keys = torch.cat([l2n(k64)] + ([] if queue is None else [l2n(queue.detach().double())]))
    logits = q64 @ keys.T / temperature
    t = dense_targets(index, weight, keys.shape[0])
    ce = -(t * F.log_softmax(logits, dim=1)).sum(1)
    has_target = (t.sum(1) > 0).double()
    w = has_target if row_weights is None else row_weights.double() * has_target
    if reduction == "none":
        return w * ce
    if reduction == "sum":
        return (w * ce).sum()
    return (w * ce).sum() / w.sum()


def grads(loss, *xs):
    return torch.autograd.grad(loss.sum() if loss.dim() else loss, xs, allow_unused=True)


def test_int32_targets_equal_int64_targets():
    gen = torch.Generator().manual_seed(2)
    q, k = rand(gen, 4, 5, dtype=torch.float32), rand(gen, 6, 5, dtype=torch.float32)
    t = torch.tensor([0, 5, 2, 2])
    torch.testing.assert_close(mk.info_nce(q, k, t.int()), mk.info_nce(q, k, t))


def test_hard_targets_equal_one_hot_soft_targets():
    gen = torch.Generator().manual_seed(3)
    q, k = rand(gen, 5, 4, dtype=torch.float32), rand(gen, 7, 4, dtype=torch.float32)
    t = torch.randint(0, 7, (5,), generator=gen)
    soft = (t[:, None], torch.full((5, 1), 0.25))
    torch.testing.assert_close(mk.info_nce(q, k, t), mk.info_nce(q, k, soft))


# --------------------------------------------------------------------------- soft targets


def test_soft_targets_duplicates_padding_and_empty_row():
    gen = torch.Generator().manual_seed(4)
    n, m, d = 5, 6, 4
    q0, k0 = rand(gen, n, d), rand(gen, m, d)
    index = torch.tensor(
        [
            [1, 1, 3, 0],  # duplicate index 1: weights add up
            [2, 0, 0, 0],  # zero-weight padding after one target
            [0, 0, 0, 0],  # all-zero row: no target, left out of the mean
            [5, 4, 5, 5],
            [0, 1, 2, 3],
        ]
    )
    weight = torch.tensor(
        [
            [1.0, 2.0, 1.0, 0.0],
            [3.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.25, 0.25],
            [1.0, 1.0, 1.0, 1.0],
        ]
    )
    q, k = leaf(q0), leaf(k0)
    loss = mk.info_nce(q, k, (index, weight))
    dq, dk = grads(loss, q, k)

    qe, ke = leaf(q0), leaf(k0)
    exp = expected_loss(qe, ke, index, weight)
    edq, edk = grads(exp, qe, ke)
    torch.testing.assert_close(loss.double(), exp.detach(), **FP64_TOL)
    torch.testing.assert_close(dq, edq, **FP64_TOL)
    torch.testing.assert_close(dk, edk, **FP64_TOL)
    # the row without a target contributes nothing, not even through its own query
    assert torch.count_nonzero(dq[2]) == 0

    # explicitly: mean over the 4 rows that have a target
    logp = F.log_softmax(l2n(q0) @ l2n(k0).T / 0.1, dim=1)
    rows = [
        -(logp[0, 1] * 3 + logp[0, 3]) / 4,
        -logp[1, 2],
        -(logp[3, 5] * 1.0 + logp[3, 4] * 0.5) / 1.5,
        -logp[4, :4].mean(),
    ]
    torch.testing.assert_close(loss.double(), torch.stack(rows).mean(), **FP64_TOL)

    per_row = mk.info_nce(q0, k0, (index, weight), reduction="none")
    assert per_row.shape == (n,) and per_row[2] == 0


def test_soft_targets_are_normalised_per_row():
    gen = torch.Generator().manual_seed(5)
    q, k = rand(gen, 3, 4, dtype=torch.float32), rand(gen, 5, 4, dtype=torch.float32)
    index = torch.tensor([[0, 1], [2, 3], [4, 0]])
    weight = torch.tensor([[1.0, 3.0], [0.2, 0.2], [2.0, 0.0]])
    torch.testing.assert_close(
        mk.info_nce(q, k, (index, weight)), mk.info_nce(q, k, (index, weight * 17.0))
    )
    # fp64 and fp16 target weights are accepted and mean the same thing
    torch.testing.assert_close(
        mk.info_nce(q, k, (index, weight.double())), mk.info_nce(q, k, (index, weight))
    )
    torch.testing.assert_close(
        mk.info_nce(q, k, (index.int(), weight.half())), mk.info_nce(q, k, (index, weight))
    )


# --------------------------------------------------------------------------- row weights, queue


def test_row_weights_weighted_mean():
    gen = torch.Generator().manual_seed(6)
    n, m, d = 6, 4, 3
    q0, k0 = rand(gen, n, d), rand(gen, m, d)
    t = torch.randint(0, m, (n,), generator=gen)
    rw = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 3.0])
    q, k = leaf(q0), leaf(k0)
    loss = mk.info_nce(q, k, t, row_weights=rw)
    dq, dk = grads(loss, q, k)

    qe, ke = leaf(q0), leaf(k0)
    ce = F.cross_entropy(l2n(qe) @ l2n(ke).T / 0.1, t, reduction="none")
    exp = (rw.double() * ce).sum() / rw.double().sum()
    edq, edk = grads(exp, qe, ke)
    torch.testing.assert_close(loss.double(), exp.detach(), **FP64_TOL)
    torch.testing.assert_close(dq, edq, **FP64_TOL)
    torch.testing.assert_close(dk, edk, **FP64_TOL)
    assert torch.count_nonzero(dq[1]) == 0  # weight 0: left out

    # uniform weights (any scale) give the plain mean
    torch.testing.assert_close(
        mk.info_nce(q0, k0, t, row_weights=torch.full((n,), 4.0)),
        mk.info_nce(q0, k0, t),
        **FP64_TOL,
    )
    # "sum" and "none" are weighted but not normalised
    torch.testing.assert_close(
        mk.info_nce(q0, k0, t, row_weights=rw, reduction="sum").double(),
        (rw.double() * ce).sum().detach(),
        **FP64_TOL,
    )
    torch.testing.assert_close(
        mk.info_nce(q0, k0, t, row_weights=rw, reduction="none").double(),
        (rw.double() * ce).detach(),
        **FP64_TOL,
    )


def test_row_weights_combined_with_rows_without_target():
    gen = torch.Generator().manual_seed(7)
    q0, k0 = rand(gen, 3, 4), rand(gen, 5, 4)
    index = torch.tensor([[1, 2], [0, 0], [4, 3]])
    weight = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    rw = torch.tensor([2.0, 5.0, 1.0])  # the row without target must not count its 5.0
    loss = mk.info_nce(q0, k0, (index, weight), row_weights=rw)
    exp = expected_loss(q0, k0, index, weight, row_weights=rw)
    torch.testing.assert_close(loss.double(), exp, **FP64_TOL)


def test_queue_adds_negatives_without_gradient():
    gen = torch.Generator().manual_seed(8)
    n, m, nq, d = 5, 3, 4, 6
    q0, k0, u0 = rand(gen, n, d), rand(gen, m, d), rand(gen, nq, d)
    index = torch.randint(0, m, (n, 2), generator=gen)
    weight = torch.rand(n, 2, generator=gen)
    q, k, u = leaf(q0), leaf(k0), leaf(u0)
    loss = mk.info_nce(q, k, (index, weight), queue=u)
    loss.backward()

    qe, ke = leaf(q0), leaf(k0)
    exp = expected_loss(qe, ke, index, weight, queue=u0)
    edq, edk = grads(exp, qe, ke)
    torch.testing.assert_close(loss.double(), exp.detach(), **FP64_TOL)
    torch.testing.assert_close(q.grad, edq, **FP64_TOL)
    torch.testing.assert_close(k.grad, edk, **FP64_TOL)
    assert u.grad is None
    # the queue really is in the denominator
    assert mk.info_nce(q0, k0, (index, weight)) < loss.detach()
    # hard targets with a queue: F.cross_entropy over [k; queue]
    t = index[:, 0]
    exp_hard = F.cross_entropy(l2n(q0) @ torch.cat([l2n(k0), l2n(u0)]).T / 0.1, t)
    torch.testing.assert_close(mk.info_nce(q0, k0, t, queue=u0).double(), exp_hard, **FP64_TOL)


def test_queue_not_normalized_when_normalize_false():
    gen = torch.Generator().manual_seed(9)
    q0, k0, u0 = rand(gen, 4, 3, scale=0.4), rand(gen, 5, 3, scale=0.4), rand(gen, 6, 3)
    t = torch.tensor([0, 4, 2, 1])
    exp = F.cross_entropy(q0 @ torch.cat([k0, u0]).T / 0.2, t)
    got = mk.info_nce(q0, k0, t, temperature=0.2, queue=u0, normalize=False)
    torch.testing.assert_close(got.double(), exp, **FP64_TOL)


def test_empty_queue_equals_no_queue():
    gen = torch.Generator().manual_seed(10)
    q, k = rand(gen, 4, 3, dtype=torch.float32), rand(gen, 5, 3, dtype=torch.float32)
    t = torch.tensor([0, 4, 2, 1])
    torch.testing.assert_close(mk.info_nce(q, k, t, queue=torch.empty(0, 3)), mk.info_nce(q, k, t))


# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    gen = torch.Generator().manual_seed(11)
    n, m, d = 6, 7, 5
    q0, k0 = rand(gen, n, d), rand(gen, m, d)
    index = torch.randint(0, m, (n, 3), generator=gen)
    weight = torch.rand(n, 3, generator=gen)
    weight[4] = 0  # no target: 0 in "none", absent from "sum"
    q, k = leaf(q0), leaf(k0)
    got = mk.info_nce(q, k, (index, weight), reduction=reduction)
    qe, ke = leaf(q0), leaf(k0)
    exp = expected_loss(qe, ke, index, weight, reduction=reduction)
    assert got.dtype == torch.float64
    assert got.shape == ((n,) if reduction == "none" else ())
    torch.testing.assert_close(got.double(), exp.detach(), **FP64_TOL)
    cot = torch.rand(n, generator=gen, dtype=torch.float64) if reduction == "none" else None
    dq, dk = torch.autograd.grad(got, (q, k), cot)
    edq, edk = torch.autograd.grad(exp, (qe, ke), cot)
    torch.testing.assert_close(dq, edq, **FP64_TOL)
    torch.testing.assert_close(dk, edk, **FP64_TOL)
    if reduction == "none":
        assert got[4] == 0


# --------------------------------------------------------------------------- hypothesis

SIZES = st.sampled_from([1, 2, 3, 7])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=SIZES,
    m=SIZES,
    nq=st.sampled_from([0, 1, 3]),
    d=st.sampled_from([1, 3, 7]),
    p=st.sampled_from([0, 1, 2, 3]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    normalize=st.booleans(),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    temperature=st.sampled_from([0.05, 0.1, 0.3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_against_direct_formula(
    n, m, nq, d, p, dtype, normalize, weighted, reduction, temperature, seed
):
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 if normalize else 0.5
    q0, k0 = rand(gen, n, d, dtype=dtype, scale=scale), rand(gen, m, d, dtype=dtype, scale=scale)
    queue = rand(gen, nq, d, dtype=dtype, scale=scale) if nq else None
    if p == 0:  # hard targets
        hard = torch.randint(0, m, (n,), generator=gen)
        targets, index, weight = hard, hard[:, None], torch.ones(n, 1)
    else:
        index = torch.randint(0, m, (n, p), generator=gen)
        weight = torch.rand(n, p, generator=gen) * 3
        weight[torch.rand(n, p, generator=gen) < 0.3] = 0  # padding and empty rows
        weight[0, 0] = 1.0  # at least one row has a target
        targets = (index, weight)
    row_weights = None
    if weighted:
        row_weights = torch.rand(n, generator=gen)
        row_weights[torch.rand(n, generator=gen) < 0.2] = 0
        row_weights[0] = 0.5

    q, k = leaf(q0), leaf(k0)
    got = mk.info_nce(
        q,
        k,
        targets,
        temperature=temperature,
        row_weights=row_weights,
        queue=queue,
        normalize=normalize,
        reduction=reduction,
    )
    qe, ke = leaf(q0, torch.float64), leaf(k0, torch.float64)
    exp = expected_loss(
        qe, ke, index, weight, temperature, row_weights, queue, normalize, reduction
    )
    assert got.dtype == loss_dtype(dtype)
    assert got.shape == exp.shape
    # fp32 vs fp64-exact with logits up to 20; fp64 inputs are computed in fp64
    tol = FP64_TOL if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), exp.detach(), **tol)

    cot = torch.rand(exp.shape, generator=gen, dtype=torch.float64)
    dq, dk = torch.autograd.grad(got, (q, k), cot.to(got.dtype))
    edq, edk = torch.autograd.grad(exp, (qe, ke), cot)
    assert dq.dtype == dtype and dk.dtype == dtype
    torch.testing.assert_close(dq.double(), edq, **tol)
    torch.testing.assert_close(dk.double(), edk, **tol)


# --------------------------------------------------------------------------- adversarial


def test_large_logits_stay_finite():
    """temperature 0.01, no normalisation, norms ~ 40: logits up to ~1.6e5 (exp overflows)."""
    gen = torch.Generator().manual_seed(12)
    n, m, d = 6, 5, 4
    # small integers: every dot product is exact in fp32, so fp32 and fp64 see the same logits
    q0 = torch.randint(-20, 21, (n, d), generator=gen).float()
    k0 = torch.randint(-20, 21, (m, d), generator=gen).float()
    t = torch.randint(0, m, (n,), generator=gen)
    q, k = leaf(q0), leaf(k0)
    loss = mk.info_nce(q, k, t, temperature=0.01, normalize=False)
    dq, dk = grads(loss, q, k)
    assert torch.isfinite(loss) and torch.isfinite(dq).all() and torch.isfinite(dk).all()

    qe, ke = leaf(q0, torch.float64), leaf(k0, torch.float64)
    logits = qe @ ke.T / 0.01
    exp = F.cross_entropy(logits, t)
    edq, edk = grads(exp, qe, ke)
    scale = logits.abs().max().item()
    assert scale > 1e4
    torch.testing.assert_close(loss.double(), exp.detach(), rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(dq.double(), edq, rtol=1e-4, atol=1e-4 * edq.abs().max().item())
    torch.testing.assert_close(dk.double(), edk, rtol=1e-4, atol=1e-4 * edk.abs().max().item())

    # the same with soft targets, a queue and reduction="none"
    u0 = torch.randint(-20, 21, (3, d), generator=gen).float()
    index = torch.randint(0, m, (n, 2), generator=gen)
    weight = torch.rand(n, 2, generator=gen)
    got = mk.info_nce(
        q0, k0, (index, weight), temperature=0.01, queue=u0, normalize=False, reduction="none"
    )
    exp = expected_loss(q0, k0, index, weight, 0.01, queue=u0, normalize=False, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6 * scale)


def test_identical_keys_ties():
    gen = torch.Generator().manual_seed(13)
    n, m, d = 4, 5, 3
    q0 = rand(gen, n, d)
    k0 = rand(gen, 1, d).expand(m, d).clone()
    t = torch.tensor([0, 4, 2, 2])
    q, k = leaf(q0), leaf(k0)
    loss = mk.info_nce(q, k, t)
    dq, dk = grads(loss, q, k)
    # all logits of a row are equal: CE = log(M) exactly, no gradient w.r.t. the queries
    torch.testing.assert_close(
        loss.double(), torch.tensor(math.log(m), dtype=torch.float64), **FP32_TOL
    )
    torch.testing.assert_close(dq, torch.zeros_like(dq), rtol=0, atol=1e-5)
    qe, ke = leaf(q0), leaf(k0)
    edk = grads(F.cross_entropy(l2n(qe) @ l2n(ke).T / 0.1, t), ke)[0]
    torch.testing.assert_close(dk, edk, **FP32_TOL)

    # soft targets spread over tied keys give the same loss as any one of them
    index = torch.tensor([[0, 1, 2]] * n)
    weight = torch.rand(n, 3, generator=gen)
    torch.testing.assert_close(mk.info_nce(q0, k0, (index, weight)), loss.detach())


def test_no_gradient_written_into_inputs_and_inputs_unchanged():
    gen = torch.Generator().manual_seed(14)
    q0, k0, u0 = rand(gen, 3, 4), rand(gen, 4, 4), rand(gen, 2, 4)
    q, k, u = q0.clone(), k0.clone(), u0.clone()
    w = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    w0 = w.clone()
    mk.info_nce(q, k, (torch.tensor([[0, 1], [0, 0], [3, 2]]), w), queue=u)
    for a, b in ((q, q0), (k, k0), (u, u0), (w, w0)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- fp64 / gradcheck


def test_fp64_inputs_keep_fp64_precision():
    """docs/methods.md §7: the torch reference is float64-capable (it is the fp64 spec and is
    gradchecked)."""
    gen = torch.Generator().manual_seed(15)
    q0, k0 = rand(gen, 5, 8), rand(gen, 6, 8)
    t = torch.randint(0, 6, (5,), generator=gen)
    got = mk.info_nce(q0, k0, t)
    exp = F.cross_entropy(l2n(q0) @ l2n(k0).T / 0.1, t)
    torch.testing.assert_close(got.double(), exp, rtol=1e-10, atol=1e-12)


def test_gradcheck_fp64_with_queue_and_soft_targets():
    gen = torch.Generator().manual_seed(16)
    q = rand(gen, 3, 4).requires_grad_(True)
    k = rand(gen, 4, 4).requires_grad_(True)
    queue = rand(gen, 2, 4)
    index = torch.tensor([[0, 1], [3, 3], [2, 0]])
    weight = torch.tensor([[0.7, 0.3], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    rw = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)

    def f(q, k):
        return mk.info_nce(q, k, (index, weight), temperature=0.5, row_weights=rw, queue=queue)

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-5, rtol=1e-4)

    def g(q, k):
        return mk.info_nce(q, k, index[:, 0], temperature=0.5, normalize=False, reduction="none")

    assert torch.autograd.gradcheck(g, (q, k), eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_inputs(dtype, tol):
    gen = torch.Generator().manual_seed(17)
    n, m, nq, d = 6, 7, 3, 16
    q0, k0, u0 = rand(gen, n, d), rand(gen, m, d), rand(gen, nq, d)
    index = torch.randint(0, m, (n, 2), generator=gen)
    weight = torch.rand(n, 2, generator=gen)
    rw = torch.rand(n, generator=gen) + 0.1
    q, k, u = leaf(q0, dtype), leaf(k0, dtype), u0.to(dtype)
    loss = mk.info_nce(q, k, (index, weight), row_weights=rw, queue=u)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert q.grad.dtype == dtype and k.grad.dtype == dtype
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()

    # fp64 result on the very same (rounded) input values
    qe, ke = leaf(q.detach(), torch.float64), leaf(k.detach(), torch.float64)
    exp = expected_loss(qe, ke, index, weight, row_weights=rw, queue=u.double())
    edq, edk = grads(exp, qe, ke)
    torch.testing.assert_close(loss.double(), exp.detach(), rtol=tol, atol=tol)
    gscale = max(edq.abs().max().item(), edk.abs().max().item())
    torch.testing.assert_close(q.grad.double(), edq, rtol=tol, atol=tol * gscale)
    torch.testing.assert_close(k.grad.double(), edk, rtol=tol, atol=tol * gscale)

    hard = mk.info_nce(q.detach(), k.detach(), index[:, 0])
    assert hard.dtype == torch.float32


# --------------------------------------------------------------------------- bad inputs


def _ok():
    gen = torch.Generator().manual_seed(18)
    return (
        rand(gen, 4, 3, dtype=torch.float32),
        rand(gen, 5, 3, dtype=torch.float32),
        torch.tensor([0, 1, 4, 2]),
    )


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("q_1d", ValueError, r"^q\b"),
        ("q_3d", ValueError, r"^q\b"),
        ("q_int", TypeError, r"^q\b"),
        ("k_1d", ValueError, r"^k\b"),
        ("k_int", TypeError, r"^k\b"),
        ("k_width", ValueError, r"^k\b"),
        ("k_dtype", TypeError, r"^k\b"),
        ("queue_dtype", TypeError, r"^queue\b"),
        ("queue_1d", ValueError, r"^queue\b"),
        ("queue_width", ValueError, r"^queue\b"),
        ("queue_int", TypeError, r"^queue\b"),
        ("targets_2d_tensor", ValueError, r"^targets\b"),
        ("targets_len", ValueError, r"^targets\b"),
        ("targets_float", TypeError, r"^targets\b"),
        ("targets_list_of_ints", TypeError, r"^targets\b"),
        ("targets_minus_one", ValueError, r"^targets\b"),
        ("targets_m", ValueError, r"^targets\b"),
        ("soft_index_out_of_range", ValueError, r"^targets\b"),
        ("soft_index_negative", ValueError, r"^targets\b"),
        ("soft_shape_mismatch", ValueError, r"^targets\b"),
        ("soft_rows", ValueError, r"^targets\b"),
        ("soft_1d", ValueError, r"^targets\[0\]"),
        ("soft_weight_int", TypeError, r"^targets\[1\]"),
        ("soft_weight_negative", ValueError, r"^targets\[1\]"),
        ("soft_weight_nan", ValueError, r"^targets\[1\]"),
        ("soft_weight_inf", ValueError, r"^targets\[1\]"),
        ("row_weights_2d", ValueError, r"^row_weights\b"),
        ("row_weights_len", ValueError, r"^row_weights\b"),
        ("row_weights_int", TypeError, r"^row_weights\b"),
        ("row_weights_negative", ValueError, r"^row_weights\b"),
        ("row_weights_nan", ValueError, r"^row_weights\b"),
        ("temperature_0", ValueError, r"^temperature\b"),
        ("temperature_neg", ValueError, r"^temperature\b"),
        ("temperature_nan", ValueError, r"^temperature\b"),
        ("reduction", ValueError, r"^reduction\b"),
    ],
)
def test_bad_inputs(case, exc, match):
    q, k, t = _ok()
    kw = dict(q=q, k=k, targets=t)
    soft_i, soft_w = torch.tensor([[0, 1], [2, 2], [4, 0], [3, 1]]), torch.rand(4, 2)
    if case == "q_1d":
        kw["q"] = q[0]
    elif case == "q_3d":
        kw["q"] = q[None]
    elif case == "q_int":
        kw["q"] = q.long()
    elif case == "k_1d":
        kw["k"] = k[0]
    elif case == "k_int":
        kw["k"] = k.int()
    elif case == "k_width":
        kw["k"] = torch.randn(5, 4)
    elif case == "k_dtype":
        kw["k"] = k.double()
    elif case == "queue_dtype":
        kw["queue"] = torch.randn(2, 3, dtype=torch.float64)
    elif case == "queue_1d":
        kw["queue"] = torch.randn(3)
    elif case == "queue_width":
        kw["queue"] = torch.randn(2, 4)
    elif case == "queue_int":
        kw["queue"] = torch.ones(2, 3, dtype=torch.long)
    elif case == "targets_2d_tensor":
        kw["targets"] = t[:, None]
    elif case == "targets_len":
        kw["targets"] = t[:3]
    elif case == "targets_float":
        kw["targets"] = t.float()
    elif case == "targets_list_of_ints":
        kw["targets"] = [0, 1, 4, 2]
    elif case == "targets_minus_one":
        kw["targets"] = torch.tensor([0, -1, 2, 3])
    elif case == "targets_m":
        kw["targets"] = torch.tensor([0, 1, 5, 3])
    elif case == "soft_index_out_of_range":
        kw["targets"] = (torch.tensor([[0, 1], [2, 5], [4, 0], [3, 1]]), soft_w)
    elif case == "soft_index_negative":
        kw["targets"] = (torch.tensor([[0, 1], [2, -1], [4, 0], [3, 1]]), soft_w)
    elif case == "soft_shape_mismatch":
        kw["targets"] = (soft_i, torch.rand(4, 3))
    elif case == "soft_rows":
        kw["targets"] = (soft_i[:3], soft_w[:3])
    elif case == "soft_1d":
        kw["targets"] = (soft_i[:, 0], soft_w)
    elif case == "soft_weight_int":
        kw["targets"] = (soft_i, torch.ones(4, 2, dtype=torch.long))
    elif case == "soft_weight_negative":
        kw["targets"] = (soft_i, torch.tensor([[1.0, 0.0], [1.0, -0.5], [1.0, 0], [1.0, 0]]))
    elif case == "soft_weight_nan":
        kw["targets"] = (
            soft_i,
            torch.tensor([[1.0, 0.0], [1.0, float("nan")], [1.0, 0], [1.0, 0]]),
        )
    elif case == "soft_weight_inf":
        kw["targets"] = (
            soft_i,
            torch.tensor([[1.0, 0.0], [1.0, float("inf")], [1.0, 0], [1.0, 0]]),
        )
    elif case == "row_weights_2d":
        kw["row_weights"] = torch.ones(4, 1)
    elif case == "row_weights_len":
        kw["row_weights"] = torch.ones(5)
    elif case == "row_weights_int":
        kw["row_weights"] = torch.ones(4, dtype=torch.long)
    elif case == "row_weights_negative":
        kw["row_weights"] = torch.tensor([1.0, -1.0, 1.0, 1.0])
    elif case == "row_weights_nan":
        kw["row_weights"] = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    elif case == "temperature_0":
        kw["temperature"] = 0
    elif case == "temperature_neg":
        kw["temperature"] = -1
    elif case == "temperature_nan":
        kw["temperature"] = float("nan")
    elif case == "reduction":
        kw["reduction"] = "avg"
    with pytest.raises(exc, match=match):
        mk.info_nce(**kw)


# --------------------------------------------------------------------------- torch.library


def _op_args(dtype, with_queue):
    gen = torch.Generator().manual_seed(19)
    q = l2n(rand(gen, 5, 4, dtype=dtype)).requires_grad_(True)
    k = l2n(rand(gen, 6, 4, dtype=dtype)).requires_grad_(True)
    queue = l2n(rand(gen, 3, 4, dtype=dtype)) if with_queue else None
    index = torch.randint(0, 6, (5, 2), generator=gen)
    weight = torch.rand(5, 2, generator=gen)
    weight[3] = 0  # a row without target
    weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-30)
    # the op receives target weights in the accumulation dtype (as mk.info_nce builds them)
    return (q, k, queue, index, weight.to(loss_dtype(dtype)), 0.1, True, "torch")


@pytest.mark.parametrize("with_queue", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype, with_queue):
    torch.library.opcheck(torch.ops.mgc_kernels.info_nce.default, _op_args(dtype, with_queue))


def test_torch_compile_fullgraph_matches_eager():
    """The custom op traces without graph breaks (aot_eager: no codegen, fast on CPU)."""
    gen = torch.Generator().manual_seed(20)
    q0, k0, u0 = rand(gen, 6, 4), rand(gen, 5, 4), rand(gen, 3, 4)
    index = torch.randint(0, 5, (6, 2), generator=gen)
    weight = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    rw = torch.rand(6, generator=gen, dtype=torch.float64)

    def f(q, k):
        return mk.info_nce(q, k, (index, weight), row_weights=rw, queue=u0)

    assert_compile_matches_eager(f, q0, k0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(21)
    q0, k0, u0 = rand(gen, 4, 6).T, rand(gen, 4, 5).T, rand(gen, 4, 3).T  # transposed views
    index = torch.randint(0, 5, (2, 6), generator=gen).T
    weight = torch.rand(2, 6, generator=gen).T
    rw = torch.rand(12, generator=gen)[::2]
    assert not q0.is_contiguous() and not index.is_contiguous() and not rw.is_contiguous()
    got = mk.info_nce(q0, k0, (index, weight), row_weights=rw, queue=u0)
    exp = expected_loss(q0, k0, index, weight, row_weights=rw, queue=u0)
    torch.testing.assert_close(got, exp, **FP64_TOL)


def test_soft_target_weights_whose_sum_overflows_are_still_normalised():
    """Finite, non-negative weights pass validation, so their row must keep its target even
    when the row sum overflows fp32 (3e38 + 3e38)."""
    gen = torch.Generator().manual_seed(22)
    q0, k0 = rand(gen, 2, 3, dtype=torch.float32), rand(gen, 3, 3, dtype=torch.float32)
    index = torch.tensor([[0, 1], [2, 2]])
    huge = torch.tensor([[3e38, 3e38], [1.0, 0.0]])
    same = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    got = mk.info_nce(q0, k0, (index, huge), reduction="none")
    exp = mk.info_nce(q0, k0, (index, same), reduction="none")
    assert got[0] > 0, "row 0 silently lost its target"
    torch.testing.assert_close(got, exp)


def test_fp16_inputs_with_large_norms():
    """fp16 values ~2e4 are finite, but their L2 norm (~8e4) is not representable in fp16: the
    normalisation must accumulate in fp32 (docs/methods.md §7: every op accumulates in fp32),
    else the normalised rows are 0 (or NaN) and the loss is log(M) or NaN instead of the right
    value."""
    gen = torch.Generator().manual_seed(23)
    q0, k0 = rand(gen, 3, 16, scale=2e4), rand(gen, 4, 16, scale=2e4)
    t = torch.tensor([0, 1, 3])
    q, k = leaf(q0, torch.float16), leaf(k0, torch.float16)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    loss = mk.info_nce(q, k, t)
    loss.backward()
    qe, ke = q.detach().double(), k.detach().double()
    exp = F.cross_entropy(l2n(qe) @ l2n(ke).T / 0.1, t)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), exp, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()
