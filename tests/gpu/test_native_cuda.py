"""The native backend's CUDA kernels (csrc/cuda/*.cu) through the public API, against the torch
reference.

Geometry (``correspondence``, ``sample_pairs``) must equal the reference bit for bit and index
for index. The reference they are compared with runs on the CPU: that is the spec (correctly
rounded divisions); the reference run on CUDA tensors divides by a Python number through a
rounded reciprocal, which may differ in the last bit. Pooling follows the tolerance rule
(docs/methods.md §7)
``|fast - exact| <= |reference - exact| + tol`` against the reference on CUDA in the same dtype.
Skipped without CUDA (conftest.py) or when the native backend cannot run on CUDA here.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _geometry import crop_pairs, released_views

from ._multigrain_pool import (
    CELLS,
    GRID,
    B,
    C,
    check_backward,
    check_deterministic,
    check_forward,
    check_int64_offsets,
    tokens_like,
    upstream,
)

pytestmark = pytest.mark.gpu

METRICS = ["mgc", "iou", "ioa"]
METHODS = ["mgc", "topk", "all"]
BOX_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
POOL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def native_on_cuda():
    """Build or load the extension once; skip the module where it has no CUDA kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mgc_kernels import native

    runs, why = native.supports(torch.device("cuda"))
    if not runs:
        pytest.skip(f"the native backend does not run on CUDA here: {why}")


def on_cuda(views):
    return [t.cuda() for t in views]


def as_dtype(views, dtype):
    boxes1, flips1, boxes2, flips2 = views
    return boxes1.to(dtype), flips1, boxes2.to(dtype), flips2


def adversarial_views(dtype=torch.float64):
    """Boundary cases in one batch: identical views (one flipped), views whose cell edges
    coincide, touching and disjoint views, one inside the other, 4-pixel crops, fractional and
    large coordinates."""
    rows = [
        ((0, 0, 224, 224, 0), (0, 0, 224, 224, 0)),
        ((0, 0, 224, 224, 0), (0, 0, 224, 224, 1)),
        ((0, 0, 224, 224, 1), (16, 16, 240, 240, 0)),  # shifted by exactly one cell
        ((0, 0, 112, 112, 0), (112, 0, 224, 112, 1)),  # touching edges
        ((0, 0, 100, 100, 0), (200, 200, 300, 300, 0)),  # disjoint
        ((10, 20, 110, 220, 1), (30, 40, 60, 70, 0)),  # view 2 inside view 1
        ((30, 40, 60, 70, 0), (10, 20, 110, 220, 1)),  # view 1 inside view 2
        ((5, 5, 9, 9, 0), (6, 6, 10, 10, 1)),  # 4-pixel crops
        ((0.5, 1.25, 100.75, 99.5, 1), (3.3, 0.1, 77.7, 150.9, 0)),
        ((10000, 20000, 10224, 20224, 0), (10100, 20050, 10324, 20274, 1)),
        ((0, 0, 320, 180, 0), (160, 0, 480, 180, 0)),  # half overlap, non-square
        ((7, 3, 231, 227, 1), (7, 3, 231, 227, 1)),
    ]
    boxes1 = torch.tensor([r[0][:4] for r in rows], dtype=dtype)
    boxes2 = torch.tensor([r[1][:4] for r in rows], dtype=dtype)
    flips1 = torch.tensor([bool(r[0][4]) for r in rows])
    flips2 = torch.tensor([bool(r[1][4]) for r in rows])
    return boxes1, flips1, boxes2, flips2


def batch_of(size: int):
    """The first ``size`` images of the released crops (``size`` 0: an empty batch)."""
    boxes1, flips1, boxes2, flips2 = released_views(batch=max(size, 1))
    return boxes1[:size], flips1[:size], boxes2[:size], flips2[:size]


# ---------------------------------------------------------------------------- correspondence --


def assert_correspondence_exact(cpu_views, cell, metric, grid=GRID):
    want = mk.correspondence(*cpu_views, grid, cell, metric, backend="torch")
    got = mk.correspondence(*on_cuda(cpu_views), grid, cell, metric, backend="native")
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", BOX_DTYPES)
@pytest.mark.parametrize("cell", [1, 2, 7, 14])
@pytest.mark.parametrize("metric", METRICS)
def test_correspondence_bit_exact_released_crops(metric, cell, dtype):
    assert_correspondence_exact(as_dtype(released_views(seed=cell), dtype), cell, metric)


@pytest.mark.parametrize("dtype", BOX_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_correspondence_bit_exact_adversarial(metric, dtype):
    for cell in (1, 2, 7, 14):
        assert_correspondence_exact(adversarial_views(dtype), cell, metric)


@given(crop_pairs(), st.sampled_from([1, 2, 7, 14]), st.sampled_from(METRICS))
def test_correspondence_bit_exact_random_crops(v, cell, metric):
    (boxes1, flips1), (boxes2, flips2) = v
    for dtype in (torch.float32, torch.float64):
        assert_correspondence_exact(as_dtype((boxes1, flips1, boxes2, flips2), dtype), cell, metric)


def test_correspondence_empty_batch():
    assert_correspondence_exact(batch_of(0), 2, "mgc")


# ------------------------------------------------------------------------------ sample_pairs --


def assert_pairs_equal(cpu_views, cell, k, method, grid=GRID):
    want = mk.sample_pairs(*cpu_views, grid, cell, k, method, backend="torch")
    got = mk.sample_pairs(*on_cuda(cpu_views), grid, cell, k, method, backend="native")
    for name, g, w in zip(("idx1", "idx2", "weight"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert g.is_cuda and torch.equal(g.cpu(), w), name


@pytest.mark.parametrize("batch", [0, 1, 256])
@pytest.mark.parametrize("cell, k", [(1, 10), (2, 10), (7, 2)])
@pytest.mark.parametrize("method", METHODS)
def test_sample_pairs_equal_released_crops(method, cell, k, batch):
    assert_pairs_equal(batch_of(batch), cell, k, method)


@pytest.mark.parametrize("dtype", BOX_DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_sample_pairs_equal_adversarial(method, dtype):
    for cell, k in ((1, 10), (2, 10), (7, 2), (14, 1), (1, 40000)):  # k > n^4 pads
        assert_pairs_equal(adversarial_views(dtype), cell, k, method)


@given(crop_pairs(), st.sampled_from([1, 2, 7]), st.sampled_from(METHODS), st.integers(1, 60))
def test_sample_pairs_equal_random_crops(v, cell, method, k):
    (boxes1, flips1), (boxes2, flips2) = v
    for dtype in (torch.float32, torch.float64):
        assert_pairs_equal(as_dtype((boxes1, flips1, boxes2, flips2), dtype), cell, k, method)


def test_sample_pairs_custom_strides_and_view_size():
    views = on_cuda(released_views(batch=64, seed=5))
    for strides, view_size in ((((3, 1, 5), (2, 1, 4)), 224.0), (((12, 2, 8), (8, 2, 6)), 96.0)):
        want = mk.sample_pairs(
            *[t.cpu() for t in views],
            14,
            1,
            16,
            "mgc",
            strides=strides,
            view_size=view_size,
            backend="torch",
        )
        got = mk.sample_pairs(
            *views, 14, 1, 16, "mgc", strides=strides, view_size=view_size, backend="native"
        )
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


# --------------------------------------------------------------------------- multigrain_pool --


@pytest.mark.parametrize("dtype", POOL_DTYPES + [torch.float64])
def test_pool_forward_matches_reference(dtype):
    check_forward(tokens_like(B, GRID, C, dtype), GRID, CELLS, "native")


@pytest.mark.parametrize("unused", [None, 2])
@pytest.mark.parametrize("dtype", POOL_DTYPES + [torch.float64])
def test_pool_backward_matches_reference(dtype, unused):
    x = tokens_like(B, GRID, C, dtype)
    check_backward(x, GRID, CELLS, upstream(x, GRID, CELLS, unused=unused), "native")


@pytest.mark.parametrize(
    "grid, cells, channels",
    [
        (6, [2, 3], 70),  # C not a multiple of the vector: scalar path
        (5, [1, 5], 17),
        (4, [4], 1),
        (14, [1, 2, 7, 14], 3),
        (3, [1, 3], 5),
        (32, [1, 2, 4, 8, 16, 32], 96),  # a large grid
        (16, [16, 8, 4, 2, 1], 24),  # cells in reverse order
        (12, [1, 2, 3, 4, 6, 12, 1, 2, 3], 40),  # more cells than one launch holds (8): groups
    ],
)
@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_pool_awkward_shapes(dtype, grid, cells, channels):
    x = tokens_like(3, grid, channels, dtype)
    check_forward(x, grid, cells, "native")
    check_backward(x, grid, cells, upstream(x, grid, cells, unused=len(cells) // 2), "native")


@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_pool_deterministic(dtype):
    check_deterministic(tokens_like(B, GRID, C, dtype), "native")


def test_pool_int64_offsets():
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB")
    check_int64_offsets("native")
