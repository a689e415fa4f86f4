"""region_boxes' Triton kernel against the torch reference, through Triton's interpreter on CPU:
bit for bit."""

import torch
from hypothesis import given

import mgc_kernels as mk
from _geometry import BOX_DTYPES, SMALL_GRIDS, boxes_as, float_views, same
from _helpers import requires_triton

pytestmark = requires_triton


@given(float_views(), SMALL_GRIDS, BOX_DTYPES)
def test_region_boxes_bit_exact(v, grid_cell, dtype):
    b1, f1, _, _ = boxes_as(v, dtype)
    grid, cell = grid_cell
    same(
        [mk.region_boxes(b1, f1, grid, cell, backend="triton")],
        [mk.region_boxes(b1, f1, grid, cell, backend="torch")],
    )


def test_empty_batch():
    empty, no = torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)
    assert mk.region_boxes(empty, no, 4, 2, backend="triton").shape == (0, 4, 4)
