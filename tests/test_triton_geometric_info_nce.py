"""``geometric_info_nce`` on the Triton backend (through the interpreter on CPU) against the torch
reference, by the tolerance rule of DESIGN.md (see tests/test_triton_info_nce.py): all three
metrics, several images, rows without any overlap, boxes that only touch, tiles of 16 with
ragged last tiles, fp32 and fp64 boxes (the kernels make the targets in fp32)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from mgc_kernels.reference import geometric_info_nce as reference

try:
    from ._helpers import assert_close_to_exact, leaf, rand, requires_triton
    from .test_geometric_info_nce import METRICS, random_boxes
    from .test_triton_info_nce import (REL_TOL, assert_obeys_rule, cotangent, error_scales,
                                       small_blocks)
except ImportError:
    from _helpers import assert_close_to_exact, leaf, rand, requires_triton
    from test_geometric_info_nce import METRICS, random_boxes
    from test_triton_info_nce import (REL_TOL, assert_obeys_rule, cotangent, error_scales,
                                      small_blocks)

pytestmark = requires_triton


def run(backend, dtype, q0, k0, geometry, cot, **kwargs):
    q, k = leaf(q0, dtype), leaf(k0, dtype)
    loss = mk.geometric_info_nce(q, k, *geometry, backend=backend, **kwargs)
    dq, dk = torch.autograd.grad(loss, (q, k), None if cot is None else cot.to(loss.dtype))
    return loss, dq, dk


def check(q0, k0, geometry, temperature=0.1, metric="mgc", normalize=True, reduction="mean",
          seed=0):
    """Triton's loss, dq and dk obey the tolerance rule; returns Triton's three tensors."""
    cot = cotangent(len(q0), reduction, seed)
    kwargs = dict(temperature=temperature, metric=metric, normalize=normalize,
                  reduction=reduction)
    fast = run("triton", torch.float32, q0, k0, geometry, cot, **kwargs)
    ref = run("torch", torch.float32, q0, k0, geometry, cot, **kwargs)
    exact = run("torch", torch.float64, q0, k0, geometry, cot, **kwargs)
    rho = reference.geometric_info_nce(q0.double(), k0.double(), *geometry, temperature,
                                       metric)[2]  # the row weights: independent of q and k
    assert_obeys_rule(fast, ref, exact, *error_scales(q0, [k0], normalize, temperature), rho,
                      reduction, cot)
    return fast


def hand_made(dtype=torch.float32):
    """Three images; query 3 lies far from every key, query 4 only touches key 3's edge, query
    6's image has no key, key 7's image has no query."""
    q_regions = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 3], [50, 50, 51, 51],
                              [3, 0, 4, 2], [0.5, 0.5, 1.5, 1.5], [0, 0, 2, 2]], dtype=dtype)
    k_regions = torch.tensor([[0, 0, 2, 2], [1, 0, 3, 2], [0, 1, 2, 3], [2, 0, 3, 2],
                              [0, 0, 1, 1], [0, 0, 4, 4], [1, 1, 2, 2], [0, 0, 9, 9]],
                             dtype=dtype)
    q_image = torch.tensor([0, 0, 0, 0, 0, 1, 3])
    k_image = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    return q_regions, k_regions, q_image, k_image


# --------------------------------------------------------------------------- hypothesis

SIZES = st.sampled_from([1, 3, 17, 33])


@given(n=SIZES, m=SIZES, d=st.sampled_from([1, 3, 16]), images=st.sampled_from([1, 2, 3]),
       metric=st.sampled_from(METRICS), box_dtype=st.sampled_from([torch.float32, torch.float64]),
       id_dtype=st.sampled_from([torch.int64, torch.int32]), normalize=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       temperature=st.sampled_from([0.05, 0.1, 0.5]), small=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_random_against_reference(n, m, d, images, metric, box_dtype, id_dtype, normalize,
                                  reduction, temperature, small, seed):
    gen = torch.Generator().manual_seed(seed)
    qr, kr = random_boxes(gen, n, box_dtype), random_boxes(gen, m, box_dtype)
    qi = torch.randint(0, images, (n,), generator=gen).to(id_dtype)
    ki = torch.randint(0, images, (m,), generator=gen).to(id_dtype)
    kr[0], ki[0] = qr[0], qi[0]  # at least one overlapping pair
    scale = 1.0 if normalize else 0.5
    q0 = rand(gen, n, d, dtype=torch.float32, scale=scale)
    k0 = rand(gen, m, d, dtype=torch.float32, scale=scale)
    with small_blocks(small):
        check(q0, k0, (qr, kr, qi, ki), temperature, metric, normalize, reduction, seed)


# --------------------------------------------------------------------------- the op itself


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("small", [True, False])
def test_op_outputs_match_reference(metric, small):
    """The op's own outputs (row loss, the saved lse, rho) and gradients for an arbitrary
    upstream gradient; the hand-made boxes repeated so that sizes are ragged for the tiles."""
    from mgc_kernels.triton import geometric_info_nce as kernels

    gen = torch.Generator().manual_seed(1)
    qr, kr, qi, ki = hand_made()
    qr, qi = qr.repeat(5, 1)[:33], qi.repeat(5)[:33]
    kr, ki = kr.repeat(3, 1)[:19], ki.repeat(3)[:19]
    q, k = (torch.nn.functional.normalize(rand(gen, r, 16, dtype=torch.float32), dim=1)
            for r in (33, 19))
    grad = torch.randn(33, generator=gen)
    with small_blocks(small):
        got = kernels.geometric_info_nce(q, k, qr, kr, qi, ki, 0.1, metric)
        got_grads = kernels.geometric_info_nce_backward(grad, q, k, qr, kr, qi, ki, got[1], 0.1,
                                                        metric)
    want = reference.geometric_info_nce(q, k, qr, kr, qi, ki, 0.1, metric)
    want_grads = reference.geometric_info_nce_backward(grad, q, k, qr, kr, qi, ki, want[1], 0.1,
                                                       metric)
    exact = reference.geometric_info_nce(q.double(), k.double(), qr, kr, qi, ki, 0.1, metric)
    exact_grads = reference.geometric_info_nce_backward(grad.double(), q.double(), k.double(),
                                                        qr, kr, qi, ki, exact[1], 0.1, metric)
    # rows 3, 4 and 6 of each copy of the hand-made queries have no overlap
    assert torch.equal(got[2] > 0, want[2] > 0) and (got[2] == 0).sum() == 4 * 3 + 2
    for g, w, e in zip(got + got_grads, want + want_grads, exact + exact_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close_to_exact(g, w, e, REL_TOL * 10 * e.abs().max().item())  # |logit| <= 10


@pytest.mark.parametrize("metric", METRICS)
def test_rows_without_overlap_contribute_nothing(metric):
    gen = torch.Generator().manual_seed(2)
    geometry = hand_made()
    q0, k0 = rand(gen, 7, 5, dtype=torch.float32), rand(gen, 8, 5, dtype=torch.float32)
    per_row, dq, dk = check(q0, k0, geometry, metric=metric, reduction="none")
    for row in (3, 4, 6):  # far away, touching only, no key of its image
        assert per_row[row] == 0 and torch.count_nonzero(dq[row]) == 0
    assert torch.count_nonzero(dk[7]) > 0  # a key of an image without queries: a negative


def test_no_overlap_anywhere():
    gen = torch.Generator().manual_seed(3)
    qr, kr, _, _ = hand_made()
    qi, ki = torch.zeros(7, dtype=torch.long), torch.ones(8, dtype=torch.long)
    q, k = leaf(rand(gen, 7, 4, dtype=torch.float32)), leaf(rand(gen, 8, 4, dtype=torch.float32))
    loss = mk.geometric_info_nce(q, k, qr, kr, qi, ki, reduction="sum", backend="triton")
    loss.backward()
    assert loss.item() == 0
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(k.grad) == 0


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(4)
    geometry = hand_made()
    q0, k0 = rand(gen, 7, 6, dtype=torch.float32), rand(gen, 8, 6, dtype=torch.float32)

    def f(q, k):
        return mk.geometric_info_nce(q, k, *geometry, metric="iou", backend="triton")

    q, k = leaf(q0), leaf(k0)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k)
    loss.backward()
    want = check(q0, k0, geometry, metric="iou")
    for got, exp in zip((loss, q.grad, k.grad), want):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
