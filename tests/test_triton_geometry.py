"""Triton geometry kernels (region_boxes, correspondence, sample_pairs) against the torch
reference, through Triton's interpreter on CPU: bit for bit, ties included."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk

try:
    from ._helpers import requires_triton
    from .test_geometry import collapsed_crop
except ImportError:
    from _helpers import requires_triton
    from test_geometry import collapsed_crop

pytestmark = requires_triton


@st.composite
def views(draw, batch=st.integers(1, 3), fractional=st.booleans()):
    """Two views of ``batch`` images of a 300-pixel source, overlapping or not, maybe flipped."""
    frac = draw(fractional)
    coords = st.floats(0, 280, width=32) if frac else st.integers(0, 280)
    sizes = st.floats(4, 200, width=32) if frac else st.integers(4, 200)
    rows = []
    for _ in range(draw(batch)):
        row = []
        for _view in range(2):
            x, y, w, h = draw(coords), draw(coords), draw(sizes), draw(sizes)
            row.append([x, y, x + w, y + h])
        rows.append(row)
    boxes = torch.tensor(rows, dtype=torch.float32)
    flips = torch.tensor(
        draw(st.lists(st.booleans(), min_size=2 * len(rows), max_size=2 * len(rows)))
    ).reshape(-1, 2)
    return boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1]


SMALL_GRIDS = st.sampled_from([(4, 1), (4, 2), (6, 1), (6, 3), (7, 1), (14, 2), (14, 7), (14, 14)])


def same(fast, reference):
    for f, r in zip(fast, reference):
        assert f.dtype == r.dtype and torch.equal(f, r)


# boxes in the float dtypes the ops take: low precision rounds weights into ties, which must rank
# as in the reference. sample_pairs rounds inside its kernel, and the interpreter rounds fp32 to
# bf16 by truncation (the GPU to nearest): its bf16 case is in tests/gpu.
BOX_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
PAIR_BOX_DTYPES = st.sampled_from([torch.float32, torch.float16])


def boxes_as(v, dtype):
    b1, f1, b2, f2 = v
    return b1.to(dtype), f1, b2.to(dtype), f2


@given(views(), SMALL_GRIDS, BOX_DTYPES)
def test_region_boxes_and_correspondence_bit_exact(v, grid_cell, dtype):
    b1, f1, b2, f2 = boxes_as(v, dtype)
    grid, cell = grid_cell
    same(
        [mk.region_boxes(b1, f1, grid, cell, backend="triton")],
        [mk.region_boxes(b1, f1, grid, cell, backend="torch")],
    )
    for metric in ("mgc", "iou", "ioa"):
        same(
            [mk.correspondence(b1, f1, b2, f2, grid, cell, metric, backend="triton")],
            [mk.correspondence(b1, f1, b2, f2, grid, cell, metric, backend="torch")],
        )


@given(
    views(),
    SMALL_GRIDS,
    st.sampled_from(["mgc", "topk", "all"]),
    st.integers(1, 12),
    PAIR_BOX_DTYPES,
)
def test_sample_pairs_bit_exact(v, grid_cell, method, k, dtype):
    b1, f1, b2, f2 = boxes_as(v, dtype)
    grid, cell = grid_cell
    fast = mk.sample_pairs(b1, f1, b2, f2, grid, cell, k, method, backend="triton")
    same(fast, mk.sample_pairs(b1, f1, b2, f2, grid, cell, k, method, backend="torch"))


OFFICIAL_VIEWS = (
    [[0.0, 0, 224, 224], [31, 7, 240, 190]],
    torch.tensor([False, True]),
    [[0.0, 0, 224, 224], [60, 40, 280, 230]],
    torch.tensor([True, False]),
)


@pytest.mark.parametrize("method", ["mgc", "topk"])
def test_sample_pairs_official_shape_bit_exact(method):
    # the released granularities at grid 14, with identical views (many ties) and a random pair
    b, f1, b2, f2 = OFFICIAL_VIEWS
    b, b2 = torch.tensor(b), torch.tensor(b2)
    for cell, k in ((1, 10), (2, 10), (7, 2)):
        fast = mk.sample_pairs(b, f1, b2, f2, 14, cell, k, method, backend="triton")
        same(fast, mk.sample_pairs(b, f1, b2, f2, 14, cell, k, method, backend="torch"))


@pytest.mark.parametrize("method", ["mgc", "topk"])
def test_sample_pairs_fp16_boxes_rank_rounded_weights(method):
    """fp16 boxes return fp16 weights; pairs whose fp32 weights round to one fp16 value tie and
    rank in visiting order, as in the reference (the kernel once ranked the fp32 weights)."""
    b, f1, b2, f2 = OFFICIAL_VIEWS
    b, b2 = torch.tensor(b, dtype=torch.float16), torch.tensor(b2, dtype=torch.float16)
    for cell, k in ((2, 10), (7, 2)):
        fast = mk.sample_pairs(b, f1, b2, f2, 14, cell, k, method, backend="triton")
        same(fast, mk.sample_pairs(b, f1, b2, f2, 14, cell, k, method, backend="torch"))


def test_sample_pairs_custom_strides_and_view_size():
    b1 = torch.tensor([[10.0, 20, 150, 170], [0, 0, 100, 100]])
    b2 = torch.tensor([[40.0, 30, 190, 200], [50, 50, 130, 90]])
    f = torch.tensor([False, True])
    for kwargs in (
        dict(strides=((5, 1, 3), (7, 2, 2))),
        dict(view_size=96.0),
        dict(view_size=100.3),
    ):
        fast = mk.sample_pairs(b1, f, b2, f, 6, 1, 8, backend="triton", **kwargs)
        same(fast, mk.sample_pairs(b1, f, b2, f, 6, 1, 8, backend="torch", **kwargs))


def test_empty_batch():
    empty, no = torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)
    assert mk.region_boxes(empty, no, 4, 2, backend="triton").shape == (0, 4, 4)
    assert mk.correspondence(empty, no, empty, no, 4, 2, backend="triton").shape == (0, 4, 4)
    assert mk.sample_pairs(empty, no, empty, no, 4, 2, 3, backend="triton").idx1.shape == (0, 3)


def test_float64_boxes_are_refused_by_triton_and_run_on_torch_under_auto():
    b, f = torch.tensor([[0.0, 0, 10, 10]], dtype=torch.float64), torch.tensor([False])
    with pytest.raises(RuntimeError, match="float64"):
        mk.correspondence(b, f, b, f, 4, 2, backend="triton")
    assert mk.correspondence(b, f, b, f, 4, 2).dtype == torch.float64


def test_compile_fullgraph_with_triton_backend():
    b1 = torch.tensor([[0.0, 0, 64, 48], [8, 8, 72, 40]])
    f = torch.tensor([True, False])

    def step(boxes):
        return mk.correspondence(boxes, f, boxes.flip(0), f, 4, 1, backend="triton").sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(b1), step(b1))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the 0/0 cells
@pytest.mark.parametrize("method", ["mgc", "topk", "all"])
def test_cells_collapsed_by_rounding_bit_exact(method):
    boxes, flips = collapsed_crop()
    views = (boxes, flips, boxes, flips)
    same(
        mk.sample_pairs(*views, 14, 1, 5, method, backend="triton"),
        mk.sample_pairs(*views, 14, 1, 5, method, backend="torch"),
    )
