"""``mk.geometric_info_nce`` (dense mode) against a direct double loop written out here.

The overlap weights are computed with explicit Python loops over (query, key) pairs from the
published formulas (mgc = |a & b| / (|a| + |b|), iou, ioa = |a & b| / |a| of the query region),
the loss from ``F.log_softmax`` on materialised float64 logits; no library helper is used for
the expected values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mgc_kernels as mk
import mgc_kernels.reference.geometric_info_nce as geometric_reference
from _helpers import FP32_TOL, FP64_TOL, assert_compile_matches_eager, l2n, leaf, rand

METRICS = ["mgc", "iou", "ioa"]


def overlap(a, b, metric: str) -> float:
    """``metric`` of two (x0, y0, x1, y1) boxes given as Python floats."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    if metric == "mgc":
        return inter / (area_a + area_b)
    if metric == "iou":
        return inter / (area_a + area_b - inter)
    assert metric == "ioa"
    return inter / area_a


def weights_loop(q_regions, k_regions, q_image, k_image, metric) -> torch.Tensor:
    """``[N, M]`` fp64 w_ij by a double loop; 0 across images."""
    qr, kr = q_regions.double().tolist(), k_regions.double().tolist()
    qi, ki = q_image.tolist(), k_image.tolist()
    w = torch.zeros(len(qr), len(kr), dtype=torch.float64)
    for i in range(len(qr)):
        for j in range(len(kr)):
            if qi[i] == ki[j]:
                w[i, j] = overlap(qr[i], kr[j], metric)
    return w


def expected_loss(
    q,
    k,
    q_regions,
    k_regions,
    q_image,
    k_image,
    temperature=0.1,
    metric="mgc",
    normalize=True,
    reduction="mean",
):
    """sum_i rho_i CE_i / sum_i rho_i in fp64 (``q``/``k`` may be fp64 leaves)."""
    w = weights_loop(q_regions, k_regions, q_image, k_image, metric)
    q64, k64 = q.double(), k.double()
    if normalize:
        q64, k64 = l2n(q64), l2n(k64)
    logp = F.log_softmax(q64 @ k64.T / temperature, dim=1)
    rho = w.sum(1)
    rows = []
    for i in range(len(rho)):
        if rho[i] > 0:
            t = w[i] / rho[i]
            rows.append(rho[i] * -(t * logp[i]).sum())
        else:
            rows.append(torch.zeros((), dtype=torch.float64))
    weighted = torch.stack(rows) if rows else torch.zeros(0, dtype=torch.float64)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / rho.sum()


def random_boxes(gen, n, dtype=torch.float32, span=8):
    """Boxes on a coarse integer lattice (exact overlaps, touching edges happen) or floats."""
    xy = torch.randint(0, span, (n, 2), generator=gen).double()
    wh = torch.randint(1, 4, (n, 2), generator=gen).double()
    jitter = torch.rand(n, 4, generator=gen, dtype=torch.float64) * 0.5
    use_jitter = (torch.rand(n, 1, generator=gen) < 0.5).double()
    boxes = torch.cat([xy, xy + wh], 1) + jitter * use_jitter
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.25)
    return boxes.to(dtype)


def check_against_loop(
    q0,
    k0,
    qr,
    kr,
    qi,
    ki,
    temperature=0.1,
    metric="mgc",
    normalize=True,
    reduction="mean",
    tol=None,
    cot_seed=0,
):
    if tol is None:
        # the overlap weights are computed in the boxes' accumulation dtype
        exact = q0.dtype == qr.dtype == kr.dtype == torch.float64
        tol = FP64_TOL if exact else FP32_TOL
    q, k = leaf(q0), leaf(k0)
    got = mk.geometric_info_nce(
        q,
        k,
        qr,
        kr,
        qi,
        ki,
        temperature=temperature,
        metric=metric,
        normalize=normalize,
        reduction=reduction,
    )
    qe, ke = leaf(q0, torch.float64), leaf(k0, torch.float64)
    exp = expected_loss(qe, ke, qr, kr, qi, ki, temperature, metric, normalize, reduction)
    # fp32 losses for fp16/bf16/fp32 inputs, fp64 for fp64 inputs
    assert got.dtype == (torch.float64 if q0.dtype == torch.float64 else torch.float32)
    assert got.shape == exp.shape
    torch.testing.assert_close(got.double(), exp.detach(), **tol)
    cot = torch.rand(
        exp.shape, generator=torch.Generator().manual_seed(cot_seed), dtype=torch.float64
    )
    dq, dk = torch.autograd.grad(got, (q, k), cot.to(got.dtype))
    edq, edk = torch.autograd.grad(exp, (qe, ke), cot)
    assert dq.dtype == q0.dtype and dk.dtype == k0.dtype
    torch.testing.assert_close(dq.double(), edq, **tol)
    torch.testing.assert_close(dk.double(), edk, **tol)
    return got, dq, dk


# --------------------------------------------------------------------------- known answers


def test_weights_loop_known_answers():
    """Sanity of the test's own formulas on hand-computed boxes."""
    a, b = [0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]  # areas 4 and 4, intersection 1
    assert overlap(a, b, "mgc") == pytest.approx(1 / 8)
    assert overlap(a, b, "iou") == pytest.approx(1 / 7)
    assert overlap(a, b, "ioa") == pytest.approx(1 / 4)
    c = [0.0, 0.0, 1.0, 4.0]  # area 4, inside a partially: intersection 2
    assert overlap(c, a, "ioa") == pytest.approx(2 / 4)
    assert overlap(a, c, "ioa") == pytest.approx(2 / 4)
    assert overlap(a, a, "mgc") == pytest.approx(0.5)
    assert overlap(a, [2.0, 0.0, 3.0, 2.0], "iou") == 0.0  # touching edge


@pytest.mark.parametrize("metric", METRICS)
def test_hand_made_example(metric):
    gen = torch.Generator().manual_seed(1)
    q_regions = torch.tensor(
        [[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 4], [10, 10, 11, 11], [0, 0, 2, 2]],
        dtype=torch.float32,
    )
    k_regions = torch.tensor(
        [
            [0, 0, 2, 2],
            [1, 1, 3, 3],
            [0, 0, 4, 1],
            [2, 0, 3, 2],
            [0, 0, 2, 2],
            [0.5, 0.5, 1.5, 1.5],
        ],
        dtype=torch.float32,
    )
    q_image = torch.tensor([0, 0, 0, 0, 1])
    k_image = torch.tensor([0, 0, 0, 0, 1, 0])
    q0, k0 = rand(gen, 5, 3), rand(gen, 6, 3)
    for reduction in ("mean", "sum", "none"):
        check_against_loop(
            q0, k0, q_regions, k_regions, q_image, k_image, metric=metric, reduction=reduction
        )

    # with metric "ioa" the weight is over the QUERY region's area (asymmetric)
    if metric == "ioa":
        w = weights_loop(q_regions, k_regions, q_image, k_image, "ioa")
        assert w[2, 2].item() == pytest.approx(1 / 4)  # |c & d| = 1, |c| = 4
        assert w[0, 5].item() == pytest.approx(1 / 4)  # |a & small| = 1, |a| = 4


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_temperature_and_normalize(temperature, normalize):
    gen = torch.Generator().manual_seed(2)
    n, m = 6, 5
    qr, kr = random_boxes(gen, n), random_boxes(gen, m)
    kr[0] = qr[0]
    qi, ki = torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 2, (m,), generator=gen)
    ki[0] = qi[0]
    scale = 1.0 if normalize else 0.3
    check_against_loop(
        rand(gen, n, 4, scale=scale),
        rand(gen, m, 4, scale=scale),
        qr,
        kr,
        qi,
        ki,
        temperature=temperature,
        normalize=normalize,
    )


def test_rows_without_overlap_are_left_out():
    gen = torch.Generator().manual_seed(3)
    q_regions = torch.tensor(
        [[0, 0, 2, 2], [50, 50, 51, 51], [1, 1, 2, 2], [2, 0, 3, 1]], dtype=torch.float32
    )  # row 1 far away, row 3 only touches an edge
    k_regions = torch.tensor([[0, 0, 2, 2], [1, 0, 2, 1], [5, 5, 6, 6]], dtype=torch.float32)
    q_image = torch.tensor([0, 0, 0, 0])
    k_image = torch.tensor([0, 0, 0])
    q0, k0 = rand(gen, 4, 3), rand(gen, 3, 3)
    got, dq, _ = check_against_loop(q0, k0, q_regions, k_regions, q_image, k_image)
    assert torch.count_nonzero(dq[1]) == 0 and torch.count_nonzero(dq[3]) == 0
    per_row = mk.geometric_info_nce(
        q0, k0, q_regions, k_regions, q_image, k_image, reduction="none"
    )
    assert per_row[1] == 0 and per_row[3] == 0 and (per_row[[0, 2]] > 0).all()
    # changing the queries of rows without overlap does not change the loss
    q1 = q0.clone()
    q1[[1, 3]] = rand(gen, 2, 3)
    torch.testing.assert_close(
        mk.geometric_info_nce(q1, k0, q_regions, k_regions, q_image, k_image), got.detach()
    )


def test_keys_of_other_images_are_negatives_with_zero_target():
    gen = torch.Generator().manual_seed(4)
    box = torch.tensor([[0, 0, 4, 4]], dtype=torch.float32)
    q_regions = box.repeat(2, 1)
    k_regions = box.repeat(3, 1)  # all boxes identical...
    q_image = torch.tensor([0, 1])
    k_image = torch.tensor([0, 1, 2])  # ...but only the key of the same image is a target
    q0, k0 = rand(gen, 2, 5), rand(gen, 3, 5)
    got, _, dk = check_against_loop(q0, k0, q_regions, k_regions, q_image, k_image)
    # each row: one positive with w = 0.5, every other key a negative: plain cross-entropy
    exp = F.cross_entropy(l2n(q0) @ l2n(k0).T / 0.1, torch.tensor([0, 1]))
    torch.testing.assert_close(got, exp, **FP64_TOL)
    # key 2 (image 2, no query of that image) still gets a gradient as a negative
    assert torch.count_nonzero(dk[2]) > 0
    # and removing it changes the loss
    without = mk.geometric_info_nce(q0, k0[:2], q_regions, k_regions[:2], q_image, k_image[:2])
    assert without < got.detach()


def test_no_overlap_anywhere():
    q_regions = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]], dtype=torch.float32)
    k_regions = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]], dtype=torch.float32)
    q_image, k_image = torch.tensor([0, 0]), torch.tensor([1, 1])
    q = torch.randn(2, 3, requires_grad=True)
    k = torch.randn(2, 3, requires_grad=True)
    per_row = mk.geometric_info_nce(q, k, q_regions, k_regions, q_image, k_image, reduction="none")
    assert torch.equal(per_row.detach(), torch.zeros(2))
    total = mk.geometric_info_nce(q, k, q_regions, k_regions, q_image, k_image, reduction="sum")
    assert total.item() == 0
    total.backward()
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(k.grad) == 0


# --------------------------------------------------------------------------- hypothesis


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.sampled_from([1, 2, 3, 7, 9]),
    m=st.sampled_from([1, 2, 3, 7]),
    d=st.sampled_from([1, 3, 7]),
    images=st.sampled_from([1, 2, 3]),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    box_dtype=st.sampled_from([torch.float64, torch.float32]),
    id_dtype=st.sampled_from([torch.int64, torch.int32]),
    normalize=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    temperature=st.sampled_from([0.05, 0.1, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_against_double_loop(
    n, m, d, images, metric, dtype, box_dtype, id_dtype, normalize, reduction, temperature, seed
):
    gen = torch.Generator().manual_seed(seed)
    qr, kr = random_boxes(gen, n, box_dtype), random_boxes(gen, m, box_dtype)
    qi = torch.randint(0, images, (n,), generator=gen).to(id_dtype)
    ki = torch.randint(0, images, (m,), generator=gen).to(id_dtype)
    kr[0], ki[0] = qr[0], qi[0]  # at least one overlapping pair
    scale = 1.0 if normalize else 0.5
    q0 = rand(gen, n, d, dtype=dtype, scale=scale)
    k0 = rand(gen, m, d, dtype=dtype, scale=scale)
    check_against_loop(
        q0,
        k0,
        qr,
        kr,
        qi,
        ki,
        temperature,
        metric,
        normalize,
        reduction,
        tol=None if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4),
        cot_seed=seed,
    )


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("n,m,chunk", [(7, 3, 7), (9, 2, 7), (5, 4, 7), (6, 9, 7), (7, 3, 1)])
@pytest.mark.parametrize("metric", METRICS)
def test_chunked_equals_unchunked(monkeypatch, n, m, chunk, metric):
    gen = torch.Generator().manual_seed(5 + n + m)
    qr, kr = random_boxes(gen, n, span=4), random_boxes(gen, m, span=4)
    qi, ki = torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 2, (m,), generator=gen)
    kr[0], ki[0] = qr[0], qi[0]
    q0, k0 = rand(gen, n, 5, dtype=torch.float32), rand(gen, m, 5, dtype=torch.float32)
    cot = torch.rand(n, generator=gen)

    def run(reduction):
        q, k = leaf(q0), leaf(k0)
        out = mk.geometric_info_nce(q, k, qr, kr, qi, ki, metric=metric, reduction=reduction)
        out.backward(cot if reduction == "none" else None)
        return out.detach(), q.grad, k.grad

    full = {r: run(r) for r in ("mean", "none")}
    monkeypatch.setattr(geometric_reference, "CHUNK_ELEMENTS", chunk)
    # the patched size really splits the rows, with a ragged last chunk where n allows it
    sizes = [s.stop - s.start for s in geometric_reference.row_chunks(n, m)]
    assert len(sizes) > 1 and sum(sizes) == n
    for r in ("mean", "none"):
        chunked = run(r)
        for a, b in zip(chunked, full[r]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and both equal the double loop
    check_against_loop(q0, k0, qr, kr, qi, ki, metric=metric)


def test_chunk_sizes_are_ragged_for_the_cases_above(monkeypatch):
    monkeypatch.setattr(geometric_reference, "CHUNK_ELEMENTS", 7)
    sizes = [s.stop - s.start for s in geometric_reference.row_chunks(7, 3)]
    assert sizes == [2, 2, 2, 1]
    sizes = [s.stop - s.start for s in geometric_reference.row_chunks(9, 2)]
    assert sizes == [3, 3, 3]


# --------------------------------------------------------------------------- vs info_nce


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_target_per_row_equals_weighted_info_nce(metric, dtype):
    """Disjoint tiny boxes: each query overlaps exactly one key of its own image."""
    gen = torch.Generator().manual_seed(6)
    n_img, per_img = 3, 4
    m = n_img * per_img
    # keys: image g, slot s -> unit box at x = 10 * s; the same boxes in every image
    k_regions = torch.tensor(
        [[10.0 * s, 0, 10.0 * s + 1, 1] for _ in range(n_img) for s in range(per_img)], dtype=dtype
    )
    k_image = torch.arange(n_img).repeat_interleave(per_img)
    # queries: a shifted box of different size over one chosen key's slot, so rho differs
    n = 7
    q_image = torch.randint(0, n_img, (n,), generator=gen)
    slot = torch.randint(0, per_img, (n,), generator=gen)
    shift = torch.rand(n, generator=gen, dtype=torch.float64) * 0.8
    size = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    x0 = 10.0 * slot + shift - 0.3
    q_regions = torch.stack([x0, shift * 0.5, x0 + size, shift * 0.5 + size], 1).to(dtype)
    target = q_image * per_img + slot

    w = weights_loop(q_regions, k_regions, q_image, k_image, metric)
    assert ((w > 0).sum(1) == 1).all() and torch.equal(w.argmax(1), target)
    rho = w.sum(1)
    assert len(set(rho.tolist())) > 1  # really weighted

    q0, k0 = rand(gen, n, 6, dtype=dtype), rand(gen, m, 6, dtype=dtype)
    for reduction in ("mean", "sum", "none"):
        qa, ka = leaf(q0), leaf(k0)
        geo = mk.geometric_info_nce(
            qa, ka, q_regions, k_regions, q_image, k_image, metric=metric, reduction=reduction
        )
        qb, kb = leaf(q0), leaf(k0)
        ref = mk.info_nce(qb, kb, target, row_weights=rho.to(dtype), reduction=reduction)
        tol = FP64_TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(geo, ref, **tol)
        geo.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(qa.grad, qb.grad, **tol)
        torch.testing.assert_close(ka.grad, kb.grad, **tol)


# --------------------------------------------------------------------------- precision


def _small_case(dtype, gen):
    q_regions = torch.tensor(
        [[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 3], [9, 9, 10, 10]], dtype=torch.float64
    )
    k_regions = torch.tensor(
        [[0, 0, 2, 2], [1, 0, 3, 2], [0, 1, 2, 3], [0, 0, 3, 3], [0, 0, 1, 1]], dtype=torch.float64
    )
    q_image = torch.tensor([0, 0, 1, 0])
    k_image = torch.tensor([0, 0, 1, 1, 0])
    return (
        rand(gen, 4, 3, dtype=dtype),
        rand(gen, 5, 3, dtype=dtype),
        q_regions,
        k_regions,
        q_image,
        k_image,
    )


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_fp64(metric):
    gen = torch.Generator().manual_seed(7)
    q0, k0, qr, kr, qi, ki = _small_case(torch.float64, gen)
    q, k = q0.requires_grad_(True), k0.requires_grad_(True)

    def f(q, k):
        return mk.geometric_info_nce(q, k, qr, kr, qi, ki, temperature=0.5, metric=metric)

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-5, rtol=1e-4)

    def g(q, k):
        return mk.geometric_info_nce(
            q, k, qr, kr, qi, ki, temperature=0.5, metric=metric, normalize=False, reduction="none"
        )

    assert torch.autograd.gradcheck(g, (q, k), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_inputs(dtype, tol):
    gen = torch.Generator().manual_seed(8)
    n, m, d = 9, 7, 16
    qr, kr = random_boxes(gen, n, span=4), random_boxes(gen, m, span=4)
    qi, ki = torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 2, (m,), generator=gen)
    kr[0], ki[0] = qr[0], qi[0]
    q, k = leaf(rand(gen, n, d, dtype=dtype)), leaf(rand(gen, m, d, dtype=dtype))
    loss = mk.geometric_info_nce(q, k, qr, kr, qi, ki)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert q.grad.dtype == dtype and k.grad.dtype == dtype
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()

    qe, ke = leaf(q.detach(), torch.float64), leaf(k.detach(), torch.float64)
    exp = expected_loss(qe, ke, qr, kr, qi, ki)
    edq, edk = torch.autograd.grad(exp, (qe, ke))
    torch.testing.assert_close(loss.double(), exp.detach(), rtol=tol, atol=tol)
    gscale = max(edq.abs().max().item(), edk.abs().max().item())
    torch.testing.assert_close(q.grad.double(), edq, rtol=tol, atol=tol * gscale)
    torch.testing.assert_close(k.grad.double(), edk, rtol=tol, atol=tol * gscale)


def test_inputs_unchanged():
    gen = torch.Generator().manual_seed(9)
    args = _small_case(torch.float32, gen)
    copies = [a.clone() for a in args]
    mk.geometric_info_nce(*args, metric="iou")
    for a, b in zip(args, copies):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("q_1d", ValueError, r"^q\b"),
        ("q_int", TypeError, r"^q\b"),
        ("k_3d", ValueError, r"^k\b"),
        ("k_width", ValueError, r"^k\b"),
        ("q_regions_1d", ValueError, r"^q_regions\b"),
        ("q_regions_cols", ValueError, r"^q_regions\b"),
        ("q_regions_rows", ValueError, r"^q_regions\b"),
        ("q_regions_int", TypeError, r"^q_regions\b"),
        ("k_regions_rows", ValueError, r"^k_regions\b"),
        ("k_regions_cols", ValueError, r"^k_regions\b"),
        ("q_regions_nan", ValueError, r"^q_regions\b"),
        ("q_regions_inf", ValueError, r"^q_regions\b"),
        ("k_regions_zero_area", ValueError, r"^k_regions\b"),
        ("q_regions_zero_width", ValueError, r"^q_regions\b"),
        ("k_regions_negative_height", ValueError, r"^k_regions\b"),
        ("q_image_2d", ValueError, r"^q_image\b"),
        ("q_image_len", ValueError, r"^q_image\b"),
        ("q_image_float", TypeError, r"^q_image\b"),
        ("k_image_len", ValueError, r"^k_image\b"),
        ("k_image_bool", TypeError, r"^k_image\b"),
        ("temperature_0", ValueError, r"^temperature\b"),
        ("temperature_neg", ValueError, r"^temperature\b"),
        ("metric", ValueError, r"^metric\b"),
        ("reduction", ValueError, r"^reduction\b"),
    ],
)
def test_bad_inputs(case, exc, match):
    gen = torch.Generator().manual_seed(10)
    q, k, qr, kr, qi, ki = _small_case(torch.float32, gen)
    kw = dict(q=q, k=k, q_regions=qr, k_regions=kr, q_image=qi, k_image=ki)
    if case == "q_1d":
        kw["q"] = q[0]
    elif case == "q_int":
        kw["q"] = q.long()
    elif case == "k_3d":
        kw["k"] = k[None]
    elif case == "k_width":
        kw["k"] = torch.randn(5, 4)
    elif case == "q_regions_1d":
        kw["q_regions"] = qr[0]
    elif case == "q_regions_cols":
        kw["q_regions"] = qr[:, :3]
    elif case == "q_regions_rows":
        kw["q_regions"] = qr[:3]
    elif case == "q_regions_int":
        kw["q_regions"] = qr.long()
    elif case == "k_regions_rows":
        kw["k_regions"] = kr[:4]
    elif case == "k_regions_cols":
        kw["k_regions"] = torch.cat([kr, kr[:, :1]], 1)
    elif case == "q_regions_nan":
        kw["q_regions"] = qr.clone()
        kw["q_regions"][2, 1] = float("nan")
    elif case == "q_regions_inf":
        kw["q_regions"] = qr.clone()
        kw["q_regions"][1, 2] = float("inf")
    elif case == "k_regions_zero_area":
        kw["k_regions"] = kr.clone()
        kw["k_regions"][3] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    elif case == "q_regions_zero_width":
        kw["q_regions"] = qr.clone()
        kw["q_regions"][0] = torch.tensor([1.0, 0.0, 1.0, 2.0])
    elif case == "k_regions_negative_height":
        kw["k_regions"] = kr.clone()
        kw["k_regions"][1] = torch.tensor([0.0, 2.0, 1.0, 1.0])
    elif case == "q_image_2d":
        kw["q_image"] = qi[:, None]
    elif case == "q_image_len":
        kw["q_image"] = qi[:3]
    elif case == "q_image_float":
        kw["q_image"] = qi.float()
    elif case == "k_image_len":
        kw["k_image"] = torch.zeros(6, dtype=torch.long)
    elif case == "k_image_bool":
        kw["k_image"] = ki.bool()
    elif case == "temperature_0":
        kw["temperature"] = 0
    elif case == "temperature_neg":
        kw["temperature"] = -1
    elif case == "metric":
        kw["metric"] = "giou"
    elif case == "reduction":
        kw["reduction"] = "mean_rows"
    with pytest.raises(exc, match=match):
        mk.geometric_info_nce(**kw)


# --------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("metric", ["mgc", "ioa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype, metric):
    gen = torch.Generator().manual_seed(11)
    q, k, qr, kr, qi, ki = _small_case(dtype, gen)
    q, k = l2n(q).detach().requires_grad_(True), l2n(k).detach().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.mgc_kernels.geometric_info_nce.default,
        (q, k, qr.to(dtype), kr.to(dtype), qi, ki, 0.1, metric, True, "torch"),
    )


def test_torch_compile_fullgraph_matches_eager():
    """The custom op traces without graph breaks (aot_eager: no codegen, fast on CPU)."""
    gen = torch.Generator().manual_seed(12)
    q0, k0, qr, kr, qi, ki = _small_case(torch.float64, gen)

    def f(q, k):
        return mk.geometric_info_nce(q, k, qr, kr, qi, ki, metric="iou")

    assert_compile_matches_eager(f, q0, k0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(13)
    q0, k0, qr, kr, qi, ki = _small_case(torch.float64, gen)
    qn, kn = q0.T.contiguous().T, k0.T.contiguous().T  # same values, column-major
    qrn, krn = qr.T.contiguous().T, kr.T.contiguous().T
    qin = torch.stack([qi, qi], 1)[:, 0]
    assert not qn.is_contiguous() and not qrn.is_contiguous() and not qin.is_contiguous()
    got = mk.geometric_info_nce(qn, kn, qrn, krn, qin, ki, metric="ioa")
    exp = expected_loss(q0, k0, qr, kr, qi, ki, metric="ioa")
    torch.testing.assert_close(got, exp, **FP64_TOL)


def test_large_logits_stay_finite():
    """temperature 0.01 without normalisation: logits up to ~1e5 (exp overflows in fp32)."""
    gen = torch.Generator().manual_seed(14)
    n, m, d = 7, 6, 4
    qr, kr = random_boxes(gen, n, span=4), random_boxes(gen, m, span=4)
    qi, ki = torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 2, (m,), generator=gen)
    kr[0], ki[0] = qr[0], qi[0]
    # small integers: every dot product is exact in fp32
    q0 = torch.randint(-20, 21, (n, d), generator=gen).float()
    k0 = torch.randint(-20, 21, (m, d), generator=gen).float()
    q, k = leaf(q0), leaf(k0)
    loss = mk.geometric_info_nce(q, k, qr, kr, qi, ki, temperature=0.01, normalize=False)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    qe, ke = leaf(q0, torch.float64), leaf(k0, torch.float64)
    exp = expected_loss(qe, ke, qr, kr, qi, ki, 0.01, normalize=False)
    edq, edk = torch.autograd.grad(exp, (qe, ke))
    scale = (q0 @ k0.T).abs().max().item() / 0.01
    assert scale > 1e4
    torch.testing.assert_close(loss.double(), exp.detach(), rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(q.grad.double(), edq, rtol=1e-4, atol=1e-4 * edq.abs().max().item())
    torch.testing.assert_close(k.grad.double(), edk, rtol=1e-4, atol=1e-4 * edk.abs().max().item())


def test_fp16_inputs_with_large_norms():
    """fp16 values ~2e4 are finite, but their L2 norm (~8e4) is not representable in fp16: the
    normalisation must accumulate in fp32 (docs/methods.md §7: every op accumulates in fp32),
    else the normalised rows are 0 (or NaN) and the loss is log(M) or NaN instead of the right
    value."""
    gen = torch.Generator().manual_seed(15)
    _, _, qr, kr, qi, ki = _small_case(torch.float32, gen)
    q = leaf(rand(gen, 4, 16, scale=2e4), torch.float16)
    k = leaf(rand(gen, 5, 16, scale=2e4), torch.float16)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    loss = mk.geometric_info_nce(q, k, qr, kr, qi, ki)
    loss.backward()
    exp = expected_loss(q.detach().double(), k.detach().double(), qr, kr, qi, ki)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), exp, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()
