"""``info_nce(targets="paired")``: MoCo's InfoNCE (own positive + queue negatives), on both
backends, against the materialised formula; and the op's differentiable LSE output."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _helpers import TRITON_LOADS, assert_close_to_exact, leaf, rand

BACKENDS = ["torch"] + (["triton"] if TRITON_LOADS else [])


def moco(q, k, queue, tau, row_weights=None):
    """cat([q . k_pos, q @ queue.T]) / tau with target 0, in fp64."""
    qn, kn, un = (F.normalize(x.double(), dim=1) for x in (q, k, queue))
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ un.T], 1) / tau
    ce = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long), reduction="none")
    w = torch.ones_like(ce) if row_weights is None else row_weights.double()
    return (w * ce).sum() / w.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    n=st.integers(1, 9),
    nq=st.integers(1, 21),
    d=st.integers(1, 9),
    tau=st.sampled_from([0.07, 0.2, 1.0]),
    weighted=st.booleans(),
    seed=st.integers(0, 99),
)
def test_paired_equals_moco_formula(backend, n, nq, d, tau, weighted, seed):
    gen = torch.Generator().manual_seed(seed)
    q0, k0, u = (
        rand(gen, n, d, dtype=torch.float32),
        rand(gen, n, d, dtype=torch.float32),
        rand(gen, nq, d, dtype=torch.float32),
    )
    rw = torch.rand(n, generator=gen) + 0.1 if weighted else None
    q, k = leaf(q0), leaf(k0)
    got = mk.info_nce(q, k, "paired", tau, row_weights=rw, queue=u, backend=backend)
    got.backward()
    ref_q, ref_k = leaf(q0), leaf(k0)
    ref = mk.info_nce(ref_q, ref_k, "paired", tau, row_weights=rw, queue=u, backend="torch")
    ref.backward()
    ex_q, ex_k = leaf(q0, torch.float64), leaf(k0, torch.float64)
    exact = moco(ex_q, ex_k, u, tau, rw)
    exact.backward()
    tol = 1e-5 * (1 + 1 / tau)
    assert_close_to_exact(got.detach(), ref.detach(), exact.detach(), tol)
    assert_close_to_exact(q.grad, ref_q.grad, ex_q.grad, tol)
    assert_close_to_exact(k.grad, ref_k.grad, ex_k.grad, tol)


def test_paired_gradcheck_fp64():
    gen = torch.Generator().manual_seed(1)
    q, k = leaf(rand(gen, 5, 4)), leaf(rand(gen, 5, 4))
    u = rand(gen, 11, 4)
    assert torch.autograd.gradcheck(lambda a, b: mk.info_nce(a, b, "paired", 0.3, queue=u), (q, k))


def test_paired_queue_gets_no_gradient():
    gen = torch.Generator().manual_seed(2)
    q, k, u = leaf(rand(gen, 4, 3)), leaf(rand(gen, 4, 3)), leaf(rand(gen, 6, 3))
    mk.info_nce(q, k, "paired", queue=u).backward()
    assert u.grad is None and q.grad is not None and k.grad is not None


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(queue=None), "queue"),
        (dict(k=torch.randn(5, 3)), "k must have size 4"),
        (dict(targets="diagonal"), "targets"),
    ],
)
def test_paired_bad_input(bad, match):
    args = dict(q=torch.randn(4, 3), k=torch.randn(4, 3), targets="paired", queue=torch.randn(6, 3))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        mk.info_nce(args["q"], args["k"], args["targets"], queue=args["queue"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_output_is_differentiable(backend):
    """d lse_i / d logits_i = softmax_i, combined with a row-loss gradient in one backward."""
    gen = torch.Generator().manual_seed(3)
    q0, k0 = rand(gen, 6, 5, dtype=torch.float32), rand(gen, 9, 5, dtype=torch.float32)
    index = torch.randint(0, 9, (6, 2), generator=gen)
    weight = torch.rand(6, 2, generator=gen)
    weight = weight / weight.sum(1, keepdim=True)
    cot_loss, cot_lse = torch.rand(6, generator=gen), torch.randn(6, generator=gen)
    q, k = leaf(q0), leaf(k0)
    row_loss, lse, _ = torch.ops.mgc_kernels.info_nce(q, k, None, index, weight, 0.5, True, backend)
    ((row_loss * cot_loss).sum() + (lse * cot_lse).sum()).backward()
    qe, ke = leaf(q0, torch.float64), leaf(k0, torch.float64)
    logits = qe @ ke.T / 0.5
    exact_lse = torch.logsumexp(logits, 1)
    exact_loss = exact_lse - (weight.double() * logits.gather(1, index)).sum(1)
    ((exact_loss * cot_loss).sum() + (exact_lse * cot_lse).sum()).backward()
    assert torch.allclose(q.grad.double(), qe.grad, atol=1e-5)
    assert torch.allclose(k.grad.double(), ke.grad, atol=1e-5)
