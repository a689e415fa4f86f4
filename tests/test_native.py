"""The native backend's C++ CPU path (csrc/cpu/*.cpp) against the torch reference, through the
public API: correspondence and sample_pairs bit for bit (ties, padding and dtypes included) on
random and adversarial crops, multigrain_pool forward and backward within fp32 rounding; the
custom ops' opcheck and a fullgraph torch.compile trace."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import mgc_kernels as mk
from _geometry import SMALL_GRIDS, collapsed_crop, crop_pairs, float_views, same
from _helpers import FP32_TOL, assert_close_to_exact, assert_compile_matches_eager
from benchmarks.cases.base import view_boxes
from test_triton_multigrain_pool import forward_backward, problems

NATIVE_LOADS, NATIVE_WHY = mk.backends.backend_status("native")
pytestmark = pytest.mark.skipif(not NATIVE_LOADS, reason=f"native backend: {NATIVE_WHY}")

METRICS = ("mgc", "iou", "ioa")
METHODS = ("mgc", "topk", "all")
GRIDS = SMALL_GRIDS | st.sampled_from([(14, 1), (12, 4), (5, 1), (3, 3)])
EXACT_DTYPES = st.sampled_from([torch.float32, torch.float64])


# ----------------------------------------------------------------------------- inputs


def relate(boxes1, boxes2, relation: str):
    """View 2 rewritten to stand in ``relation`` to view 1 (integer boxes, per image)."""
    x0, y0, x1, y1 = boxes1.unbind(1)
    w, h = x1 - x0, y1 - y0
    if relation == "identical":
        return boxes1.clone()
    if relation == "touching":  # shares view 1's right edge, overlaps rows: area 0
        return torch.stack([x1, y0 + h // 2, x1 + w, y1 + h // 2], 1)
    if relation == "inside":  # a quarter of view 1 on its cell edges at grid 14 and 4
        return torch.stack([x0, y0, x0 + w / 2, y0 + h / 2], 1)
    if relation == "contains":  # view 1 inside view 2, edges shared on one side
        return torch.stack([x0 - w, y0, x1 + w // 3, y1 + h], 1)
    return boxes2


@st.composite
def adversarial_views(draw, dtypes=EXACT_DTYPES):
    """Random integer crops (_geometry.crop_pairs, flips included) of which view 2 may be
    identical to view 1, touch it, lie inside it or contain it; in one of ``dtypes``."""
    (b1, f1), (b2, f2) = draw(crop_pairs())
    b2 = relate(
        b1, b2, draw(st.sampled_from(["random", "identical", "touching", "inside", "contains"]))
    )
    dtype = draw(dtypes)
    return b1.to(dtype), f1, b2.to(dtype), f2


def in_dtype(v, dtype):
    """The views' boxes in ``dtype``, skipping crops that rounding makes empty (bf16 holds
    integers exactly only up to 256)."""
    b1, f1, b2, f2 = v
    b1, b2 = b1.to(dtype), b2.to(dtype)
    for b in (b1, b2):
        assume(bool(((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()))
    return b1, f1, b2, f2


def any_views():
    """Fractional or integer fp32 crops (_geometry.float_views) or adversarial ones."""
    return float_views() | adversarial_views()


def both(op, *args, **kwargs):
    """``op`` run by the native and the torch backends."""
    return op(*args, backend="native", **kwargs), op(*args, backend="torch", **kwargs)


# ----------------------------------------------------------------------------- correspondence


@given(any_views(), GRIDS)
def test_correspondence_bit_exact(v, grid_cell):
    grid, cell = grid_cell
    for metric in METRICS:
        fast, ref = both(mk.correspondence, *v, grid, cell, metric)
        same([fast], [ref])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@given(v=adversarial_views(dtypes=st.just(torch.float32)))
def test_correspondence_low_precision_boxes_bit_exact(dtype, v):
    for metric in METRICS:
        fast, ref = both(mk.correspondence, *in_dtype(v, dtype), 14, 2, metric)
        same([fast], [ref])


# ----------------------------------------------------------------------------- sample_pairs


@given(any_views(), GRIDS, st.sampled_from(METHODS), st.integers(1, 40))
def test_sample_pairs_bit_exact(v, grid_cell, method, k):
    grid, cell = grid_cell
    fast, ref = both(mk.sample_pairs, *v, grid, cell, k, method)
    same(fast, ref)


@pytest.mark.parametrize("cell, k", [(1, 10), (2, 10), (7, 2)])
@given(v=adversarial_views(), method=st.sampled_from(METHODS), k_extra=st.integers(0, 100))
def test_sample_pairs_released_granularities_bit_exact(cell, k, v, method, k_extra):
    """The released cells at grid 14 with their K, and K large enough to keep every pair
    (past the bounded best-k buffer of the C++ code)."""
    for kk in (k, k + k_extra):
        same(*both(mk.sample_pairs, *v, 14, cell, kk, method))


@pytest.mark.parametrize("method", METHODS)
def test_sample_pairs_mgc_view_boxes_bit_exact(method):
    """MGC's own two-view crops (the benchmark's boxes), a batch big enough to use every thread."""
    v = view_boxes(96, seed=3)
    for cell, k in ((1, 10), (2, 10), (7, 2), (14, 1)):
        same(*both(mk.sample_pairs, *v, 14, cell, k, method))
        same(*both(mk.sample_pairs, v[0].double(), v[1], v[2].double(), v[3], 14, cell, k, method))


def test_sample_pairs_custom_strides_and_view_size():
    b1 = torch.tensor([[10.0, 20, 150, 170], [0, 0, 100, 100], [5, 5, 105, 105]])
    b2 = torch.tensor([[40.0, 30, 190, 200], [50, 50, 130, 90], [5, 5, 105, 105]])
    f = torch.tensor([False, True, True])
    for kwargs in (
        dict(strides=((5, 1, 3), (7, 2, 2))),
        dict(strides=((0.5, 1, 1), (30, 1, 9))),
        dict(view_size=96.0),
        dict(view_size=100.3),
    ):
        same(*both(mk.sample_pairs, b1, f, b2, f.flip(0), 6, 1, 8, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@given(v=adversarial_views(dtypes=st.just(torch.float32)), method=st.sampled_from(METHODS))
def test_sample_pairs_low_precision_boxes_bit_exact(dtype, v, method):
    """16-bit boxes: the reference rounds the weights to the boxes' dtype before sorting (ties
    and underflow change), and the released rule's spans start from 16-bit differences."""
    for cell, k in ((1, 10), (2, 10), (7, 2)):
        same(*both(mk.sample_pairs, *in_dtype(v, dtype), 14, cell, k, method))


def test_sample_pairs_does_not_depend_on_threads():
    v = view_boxes(64, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mk.sample_pairs(*v, 14, 1, 10, backend="native")
        torch.set_num_threads(max(2, threads))
        many = mk.sample_pairs(*v, 14, 1, 10, backend="native")
    finally:
        torch.set_num_threads(threads)
    same(one, many)


# ----------------------------------------------------------------------------- small batches


def test_empty_batch():
    empty, no = torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)
    w = mk.correspondence(empty, no, empty, no, 14, 2, backend="native")
    assert w.shape == (0, 49, 49) and w.dtype == torch.float32
    for method, k in (("mgc", 3), ("topk", 3), ("all", 0)):
        pairs = mk.sample_pairs(empty, no, empty, no, 14, 2, 3, method, backend="native")
        assert [tuple(t.shape) for t in pairs] == [(0, k)] * 3
        assert pairs.idx1.dtype == torch.long and pairs.weight.dtype == torch.float32
    outs = mk.multigrain_pool(torch.zeros(0, 16, 3), 4, (1, 2), backend="native")
    assert [tuple(o.shape) for o in outs] == [(0, 16, 3), (0, 4, 3)]


def test_single_image_disjoint_views_all_is_empty():
    b1, b2 = torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[100.0, 0, 200, 100]])
    f = torch.tensor([True])
    fast, ref = both(mk.sample_pairs, b1, f, b2, f, 14, 1, 5, "all")
    same(fast, ref)
    assert fast.idx1.shape == (1, 0)
    same(*both(mk.sample_pairs, b1, f, b2, f, 14, 1, 5, "topk"))


@pytest.mark.parametrize("method", METHODS)
def test_cells_collapsed_by_rounding_bit_exact(method):
    boxes, flips = collapsed_crop()
    same(*both(mk.sample_pairs, boxes, flips, boxes, flips, 14, 1, 5, method))


def test_single_image_known_answer():
    # identical unflipped views at cell 7: four pairs of weight 0.5, visited row-major
    b, f = torch.tensor([[0.0, 0, 224, 224]]), torch.tensor([True])
    pairs = mk.sample_pairs(b, f, b, f, 14, 7, k=6, backend="native")
    assert pairs.idx1[0].tolist() == [1, 0, 3, 2, 0, 0]  # unflipped columns first
    assert pairs.idx2[0].tolist() == [1, 0, 3, 2, 0, 0]
    assert pairs.weight[0].tolist() == [0.5] * 4 + [0.0] * 2


# ----------------------------------------------------------------------------- multigrain_pool

TOL = dict(rtol=1e-6, atol=1e-6)


def random_upstream(tokens, grid, cells, unused, gen):
    return [
        None
        if i == unused
        else torch.randn(
            tokens.shape[0], (grid // c) ** 2, tokens.shape[2], generator=gen, dtype=torch.float64
        ).to(tokens.dtype)
        for i, c in enumerate(cells)
    ]


def compare_pool(tokens, grid, cells, gen, unused=None, tol=TOL):
    """Outputs and the tokens' gradient (torch.autograd through the op) of native and torch."""
    upstream = random_upstream(tokens, grid, cells, unused, gen)
    got, got_grad = forward_backward(tokens, grid, cells, "native", upstream)
    want, want_grad = forward_backward(tokens, grid, cells, "torch", upstream)
    assert len(got) == len(cells)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)
    assert got_grad.dtype == want_grad.dtype
    torch.testing.assert_close(got_grad, want_grad, **tol)


@given(
    problems(),
    st.integers(0, 3),
    st.sampled_from([1, 3, 17, 70]),
    EXACT_DTYPES,
    st.integers(0, 2**31 - 1),
)
def test_multigrain_pool_matches_torch(problem, batch, channels, dtype, seed):
    """Any subset of cells (repeats, any order), an unused output, batch 0..3."""
    grid, cells, unused = problem
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, grid * grid, channels, generator=gen, dtype=dtype)
    compare_pool(tokens, grid, cells, gen, unused)


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_multigrain_pool_16_bit(dtype, ulp):
    """16-bit tokens accumulate in fp32: within the reference's own rounding (the tolerance
    rule, docs/methods.md §7)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 196, 40, generator=gen, dtype=torch.float64).to(dtype)
    cells = [1, 2, 7, 14]
    got, ref = both(mk.multigrain_pool, x, 14, cells)
    exact = mk.multigrain_pool(x.double(), 14, cells, backend="torch")
    for g, r, e in zip(got, ref, exact):
        assert g.dtype == dtype
        assert_close_to_exact(g, r, e, tol=2 * ulp * e.abs() + 1e-5)
    upstream = random_upstream(x, 14, cells, None, gen)
    _, got_grad = forward_backward(x, 14, cells, "native", upstream)
    _, ref_grad = forward_backward(x, 14, cells, "torch", upstream)
    _, exact_grad = forward_backward(x.double(), 14, cells, "torch", [u.double() for u in upstream])
    assert got_grad.dtype == dtype
    assert_close_to_exact(got_grad, ref_grad, exact_grad, tol=2 * ulp * exact_grad.abs() + 1e-5)


def test_multigrain_pool_single_image_known_answer():
    """Region r * n + col is the mean of its block: tokens numbered 0..T-1 give known means."""
    tokens = torch.arange(36, dtype=torch.float32).reshape(1, 36, 1).repeat(1, 1, 2)
    outs = mk.multigrain_pool(tokens, 6, [1, 2, 3, 6], backend="native")
    assert torch.equal(outs[0], tokens)
    assert torch.equal(outs[2][0, :, 0], torch.tensor([7.0, 10.0, 25.0, 28.0]))
    assert torch.equal(outs[3][0, :, 0], torch.tensor([17.5]))


def test_multigrain_pool_noncontiguous_tokens():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(5, 36, 2, generator=gen).transpose(0, 2)[:, :, :3]  # [2, 36, 3] strided
    compare_pool(tokens, 6, [2, 3], gen)


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("method", ["mgc", "topk"])
def test_opcheck_geometry(method):
    """The custom ops' schemas and fake kernels agree with the native implementations."""
    views = view_boxes(4, seed=3)
    torch.library.opcheck(
        torch.ops.mgc_kernels.correspondence.default, (*views, 7, "mgc", "native")
    )
    torch.library.opcheck(
        torch.ops.mgc_kernels.sample_pairs.default,
        (*views, 7, 5, method, 224.0, [8.0, 2.0, 4.0, 4.0, 1.0, 3.0], "native"),
    )


def test_opcheck_multigrain_pool():
    tokens = torch.randn(3, 36, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    torch.library.opcheck(
        torch.ops.mgc_kernels.multigrain_pool.default, (tokens, 6, [1, 2, 3], "native")
    )
    grads = [torch.randn(3, (6 // c) ** 2, 5) for c in (1, 2, 3)]
    torch.library.opcheck(
        torch.ops.mgc_kernels.multigrain_pool_backward.default, (grads, 6, [1, 2, 3], "native")
    )


def test_compiles_without_graph_breaks():
    """Pairs, correspondence and pooling on the native backend in one fullgraph trace, with the
    eager loss and token gradient."""
    boxes1, flips1, boxes2, flips2 = view_boxes(3, seed=5)
    gen = torch.Generator().manual_seed(6)
    weights = [torch.randn(3, (14 // c) ** 2, 4, generator=gen) for c in (1, 2, 7)]

    def f(tokens):
        pooled = mk.multigrain_pool(tokens, 14, (1, 2, 7), backend="native")
        pairs = mk.sample_pairs(boxes1, flips1, boxes2, flips2, 14, 2, 10, backend="native")
        overlap = mk.correspondence(boxes1, flips1, boxes2, flips2, 14, 7, backend="native")
        a, b = pairs.gather(pooled[1], pooled[1])
        return (
            sum((o * w).sum() for o, w in zip(pooled, weights))
            + (pairs.weight[..., None] * a * b).sum()
            + overlap.sum() * pooled[2].sum()
        )

    assert_compile_matches_eager(f, torch.randn(3, 196, 4, generator=gen), tol=FP32_TOL)
