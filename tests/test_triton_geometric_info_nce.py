"""``geometric_info_nce`` on the Triton backend (through the interpreter on CPU) against the torch
reference, by the tolerance rule (docs/methods.md §7; see tests/test_triton_info_nce.py): all
three metrics, several images, rows without any overlap, boxes that only touch, tiles of 16 with
ragged last tiles, fp32 and fp64 boxes (the kernels make the targets in fp32), fp32 and fp16
features (bf16 in tests/gpu). The ``test_fp16_*`` tests aim at the geometric side of the fp16
paths: the targets are inside the tile, so ``softmax - target`` must be formed in fp32 before
the tile is rounded, and tiny upstream gradients must not flush it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _helpers import INTERPRETER_DTYPES, geometric_info_nce_op, leaf, rand, requires_triton
from benchmarks.gpu_check.rule import unit_rows
from mgc_kernels.reference import geometric_info_nce as reference
from mgc_kernels.transforms import sample_view_boxes
from test_geometric_info_nce import METRICS, random_boxes
from test_triton_info_nce import (
    assert_obeys_rule,
    assert_op_results,
    autotuned,
    cotangent,
    error_scales,
    small_blocks,
    tiles,
)

pytestmark = requires_triton


def run(backend, dtype, q0, k0, geometry, cot, **kwargs):
    q, k = leaf(q0, dtype), leaf(k0, dtype)
    loss = mk.geometric_info_nce(q, k, *geometry, backend=backend, **kwargs)
    dq, dk = torch.autograd.grad(loss, (q, k), None if cot is None else cot.to(loss.dtype))
    return loss, dq, dk


def check(
    q0,
    k0,
    geometry,
    temperature=0.1,
    metric="mgc",
    normalize=True,
    reduction="mean",
    seed=0,
    dtype=torch.float32,
):
    """Triton's loss, dq and dk on features in ``dtype`` obey the tolerance rule (the fp32
    features are rounded to ``dtype`` first); returns Triton's three tensors."""
    q0, k0 = q0.to(dtype).float(), k0.to(dtype).float()
    cot = cotangent(len(q0), reduction, seed)
    kwargs = dict(temperature=temperature, metric=metric, normalize=normalize, reduction=reduction)
    fast = run("triton", dtype, q0, k0, geometry, cot, **kwargs)
    ref = run("torch", dtype, q0, k0, geometry, cot, **kwargs)
    exact = run("torch", torch.float64, q0, k0, geometry, cot, **kwargs)
    rho = reference.geometric_info_nce(q0.double(), k0.double(), *geometry, temperature, metric)[
        2
    ]  # the row weights: independent of q and k
    assert_obeys_rule(
        fast,
        ref,
        exact,
        *error_scales(q0, [k0], normalize, temperature),
        rho,
        reduction,
        cot,
        dtype,
    )
    return fast


def hand_made(dtype=torch.float32):
    """Three images; query 3 lies far from every key, query 4 only touches key 3's edge, query
    6's image has no key, key 7's image has no query."""
    q_regions = torch.tensor(
        [
            [0, 0, 2, 2],
            [1, 1, 3, 3],
            [0, 0, 1, 3],
            [50, 50, 51, 51],
            [3, 0, 4, 2],
            [0.5, 0.5, 1.5, 1.5],
            [0, 0, 2, 2],
        ],
        dtype=dtype,
    )
    k_regions = torch.tensor(
        [
            [0, 0, 2, 2],
            [1, 0, 3, 2],
            [0, 1, 2, 3],
            [2, 0, 3, 2],
            [0, 0, 1, 1],
            [0, 0, 4, 4],
            [1, 1, 2, 2],
            [0, 0, 9, 9],
        ],
        dtype=dtype,
    )
    q_image = torch.tensor([0, 0, 0, 0, 0, 1, 3])
    k_image = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    return q_regions, k_regions, q_image, k_image


# --------------------------------------------------------------------------- hypothesis

SIZES = st.sampled_from([1, 3, 17, 33])


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@given(
    n=SIZES,
    m=SIZES,
    d=st.sampled_from([1, 3, 16]),
    images=st.sampled_from([1, 2, 3]),
    metric=st.sampled_from(METRICS),
    box_dtype=st.sampled_from([torch.float32, torch.float64]),
    id_dtype=st.sampled_from([torch.int64, torch.int32]),
    normalize=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    temperature=st.sampled_from([0.05, 0.1, 0.5]),
    small=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_against_reference(
    dtype,
    n,
    m,
    d,
    images,
    metric,
    box_dtype,
    id_dtype,
    normalize,
    reduction,
    temperature,
    small,
    seed,
):
    gen = torch.Generator().manual_seed(seed)
    qr, kr = random_boxes(gen, n, box_dtype), random_boxes(gen, m, box_dtype)
    qi = torch.randint(0, images, (n,), generator=gen).to(id_dtype)
    ki = torch.randint(0, images, (m,), generator=gen).to(id_dtype)
    kr[0], ki[0] = qr[0], qi[0]  # at least one overlapping pair
    scale = 1.0 if normalize else 0.5
    q0 = rand(gen, n, d, dtype=torch.float32, scale=scale)
    k0 = rand(gen, m, d, dtype=torch.float32, scale=scale)
    with small_blocks(small):
        check(q0, k0, (qr, kr, qi, ki), temperature, metric, normalize, reduction, seed, dtype)


# --------------------------------------------------------------------------- the op itself


def op_results(dtype, q, k, geometry, grad, temperature, metric):
    """``(row_loss, lse, rho, dq, dk)`` of the op itself (``dq`` from the forward's ``v`` as the
    op's autograd forms it): Triton's on the features rounded to
    ``dtype``, then the reference's on the same values in fp32 (for 16-bit features: its result
    before the final rounding) and in fp64 (exact)."""
    from mgc_kernels.triton import geometric_info_nce as kernels

    results = []
    for ops, dt in ((kernels, dtype), (reference, torch.float32), (reference, torch.float64)):
        x, y = q.to(dtype).to(dt), k.to(dtype).to(dt)
        results.append(geometric_info_nce_op(ops, x, y, *geometry, grad, temperature, metric))
    return results


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("small", [True, False])
def test_op_outputs_match_reference(metric, small, dtype):
    """The op's own outputs (row loss, the saved lse, rho) and gradients for an arbitrary
    upstream gradient; the hand-made boxes repeated so that sizes are ragged for the tiles."""
    gen = torch.Generator().manual_seed(1)
    qr, kr, qi, ki = hand_made()
    qr, qi = qr.repeat(5, 1)[:33], qi.repeat(5)[:33]
    kr, ki = kr.repeat(3, 1)[:19], ki.repeat(3)[:19]
    q, k = (
        torch.nn.functional.normalize(rand(gen, r, 16, dtype=torch.float32), dim=1)
        for r in (33, 19)
    )
    grad = torch.randn(33, generator=gen)
    with small_blocks(small):
        fast, ref, exact = op_results(dtype, q, k, (qr, kr, qi, ki), grad, 0.1, metric)
    # rows 3, 4 and 6 of each copy of the hand-made queries have no overlap
    assert torch.equal(fast[2] > 0, ref[2] > 0) and (fast[2] == 0).sum() == 4 * 3 + 2
    assert_op_results(dtype, fast, ref, exact, 0.1, outputs=3)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_band_starts_inside_a_hot_loop_tile(dtype):
    """Three images of 49 regions, rows sorted by image as the losses build them: a block's band
    of same-image keys (tiles of 16) starts inside a tile of the hot loop (32 or 64 wide), whose
    keys from the band on must be left to the band (counted once, targets included); the same
    for dk's band of queries."""
    gen = torch.Generator().manual_seed(7)
    views = [sample_view_boxes(480, 640, generator=gen) for _ in range(3)]
    flips = torch.tensor([[False, True, False], [True, False, False]])
    q_regions, k_regions = (
        mk.region_boxes(torch.stack([v[i] for v in views]), flips[i], 14, 2).reshape(-1, 4)
        for i in (0, 1)
    )
    image = torch.arange(3).repeat_interleave(49)
    q0, k0 = rand(gen, 147, 16, dtype=torch.float32), rand(gen, 147, 16, dtype=torch.float32)
    with tiles(64):
        check(q0, k0, (q_regions, k_regions, image, image), dtype=dtype)
    with autotuned(32, 32):  # CUDA's launch path: blocks of two band groups
        check(q0, k0, (q_regions, k_regions, image, image), dtype=dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_rows_without_overlap_contribute_nothing(metric, dtype):
    gen = torch.Generator().manual_seed(2)
    geometry = hand_made()
    q0, k0 = rand(gen, 7, 5, dtype=torch.float32), rand(gen, 8, 5, dtype=torch.float32)
    per_row, dq, dk = check(q0, k0, geometry, metric=metric, reduction="none", dtype=dtype)
    for row in (3, 4, 6):  # far away, touching only, no key of its image
        assert per_row[row] == 0 and torch.count_nonzero(dq[row]) == 0
    assert torch.count_nonzero(dk[7]) > 0  # a key of an image without queries: a negative


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_no_overlap_anywhere(dtype):
    gen = torch.Generator().manual_seed(3)
    qr, kr, _, _ = hand_made()
    qi, ki = torch.zeros(7, dtype=torch.long), torch.ones(8, dtype=torch.long)
    q, k = leaf(rand(gen, 7, 4, dtype=dtype)), leaf(rand(gen, 8, 4, dtype=dtype))
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


# --------------------------------------------------------------------------- fp16 paths


@pytest.mark.parametrize("metric", METRICS)
def test_fp16_softmax_minus_target_of_confident_rows(metric):
    """One region per image, the same box in both views, ``q_i = k_i`` at tau = 0.1: each row's
    target is its own key and its softmax sits there (``1 - p_ii`` ~ 2e-3), so the gradient is
    the small ``p - t``. The kernels form it in fp32 before rounding the tile to fp16; rounding
    ``p ~ 1`` first would cost up to 2**-12 ~ 2.4e-4 against ``1 - p``."""
    gen = torch.Generator().manual_seed(20)
    n = 32
    k = unit_rows(gen, n, 128)
    boxes, image = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(n, 1), torch.arange(n)
    p = torch.softmax(k.double() @ k.double().T / 0.1, 1).diagonal()
    assert (1 - p).max() < 0.01
    fast, ref, exact = op_results(
        torch.float16, k.clone(), k, (boxes, boxes, image, image), torch.ones(n), 0.1, metric
    )
    assert_op_results(torch.float16, fast, ref, exact, 0.1, outputs=3)


def test_fp16_tiny_upstream_gradient_is_not_flushed():
    """An upstream gradient of ~1e-6: the dk kernel folds the row gradients into the tile scaled
    to ``|g| <= 1`` and the dq kernel applies them after the dot, so the fp16 tiles of
    ``softmax - target`` (times ``g`` below fp16's smallest subnormal) are not flushed."""
    gen = torch.Generator().manual_seed(21)
    qr, kr, qi, ki = hand_made()
    qr, qi = qr.repeat(5, 1)[:33], qi.repeat(5)[:33]
    kr, ki = kr.repeat(3, 1)[:19], ki.repeat(3)[:19]
    q, k = unit_rows(gen, 33, 32), unit_rows(gen, 19, 32)
    grad = (0.5 + torch.rand(33, generator=gen)) * 1e-6
    fast, ref, exact = op_results(torch.float16, q, k, (qr, kr, qi, ki), grad, 0.1, "mgc")
    assert_op_results(torch.float16, fast, ref, exact, 0.1, outputs=3)
    assert exact[4].abs().max() < 1e-4  # gradients of this size: softmax tiles times g underflow
