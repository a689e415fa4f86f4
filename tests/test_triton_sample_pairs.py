"""sample_pairs' Triton kernel against the torch reference, through Triton's interpreter on CPU:
bit for bit, ties included."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _geometry import SMALL_GRIDS, boxes_as, collapsed_crop, float_views, same
from _helpers import requires_triton

pytestmark = requires_triton

# sample_pairs rounds inside its kernel, and the interpreter rounds fp32 to bf16 by truncation
# (the GPU to nearest): its bf16 case is in tests/gpu
PAIR_BOX_DTYPES = st.sampled_from([torch.float32, torch.float16])


@given(
    float_views(),
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
    assert mk.sample_pairs(empty, no, empty, no, 4, 2, 3, backend="triton").idx1.shape == (0, 3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the 0/0 cells
@pytest.mark.parametrize("method", ["mgc", "topk", "all"])
def test_cells_collapsed_by_rounding_bit_exact(method):
    boxes, flips = collapsed_crop()
    views = (boxes, flips, boxes, flips)
    same(
        mk.sample_pairs(*views, 14, 1, 5, method, backend="triton"),
        mk.sample_pairs(*views, 14, 1, 5, method, backend="torch"),
    )
