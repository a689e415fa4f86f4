"""correspondence's Triton kernel against the torch reference, through Triton's interpreter on
CPU: bit for bit."""

import pytest
import torch
from hypothesis import given

import mgc_kernels as mk
from _geometry import BOX_DTYPES, SMALL_GRIDS, boxes_as, float_views, same
from _helpers import requires_triton

pytestmark = requires_triton


@given(float_views(), SMALL_GRIDS, BOX_DTYPES)
def test_correspondence_bit_exact(v, grid_cell, dtype):
    b1, f1, b2, f2 = boxes_as(v, dtype)
    grid, cell = grid_cell
    for metric in ("mgc", "iou", "ioa"):
        same(
            [mk.correspondence(b1, f1, b2, f2, grid, cell, metric, backend="triton")],
            [mk.correspondence(b1, f1, b2, f2, grid, cell, metric, backend="torch")],
        )


def test_empty_batch():
    empty, no = torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)
    assert mk.correspondence(empty, no, empty, no, 4, 2, backend="triton").shape == (0, 4, 4)


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
