"""region_boxes: known answers, properties, and bad input (a ValueError/TypeError that names the
argument)."""

import math

import pytest
import torch
from hypothesis import given

import mgc_kernels as mk
from _geometry import BAD_VIEW_1, CELLS, call, crop_pairs, views


def test_region_boxes_row_major_and_flipped():
    boxes, flips = views((10, 20, 110, 220, False), (10, 20, 110, 220, True))
    r = mk.region_boxes(boxes, flips, grid=14, cell=7)
    expected = torch.tensor(
        [[10, 20, 60, 120], [60, 20, 110, 120], [10, 120, 60, 220], [60, 120, 110, 220]],
        dtype=torch.float64,
    )
    assert torch.equal(r[0], expected)
    assert torch.equal(r[1], expected[[1, 0, 3, 2]])  # columns mirrored, rows kept


@given(crop_pairs(), CELLS)
def test_region_boxes_tile_the_crop(v, cell):
    (b1, f1), _ = v
    r = mk.region_boxes(b1, f1, 14, cell)
    area = ((r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])).sum(1)
    assert torch.allclose(area, (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1]))
    assert torch.all(r[..., 0] >= b1[:, None, 0]) and torch.all(r[..., 2] <= b1[:, None, 2])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, error, match", BAD_VIEW_1)
def test_bad_view(bad, error, match):
    with pytest.raises(error, match=match):
        call("region_boxes", **bad)


def test_value_checks_can_be_switched_off():
    bad = torch.tensor([[0.0, 0, math.nan, 80], [10, 10, 60, 90]])
    mk.set_value_checks(False)
    try:
        call("region_boxes", boxes1=bad)  # no host sync, no error
    finally:
        mk.set_value_checks(True)
    with pytest.raises(ValueError, match="boxes"):
        call("region_boxes", boxes1=bad)


INVALID_CORNERS = [
    [0.0, 0, math.nan, 80],
    [0.0, 0, math.inf, 80],
    [-math.inf, 0, 10, 80],
    [math.inf, 0, math.inf, 80],
    [0.0, 0, 0, 80],
    [0.0, 50, 100, 20],
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("corners", INVALID_CORNERS)
def test_every_invalid_box_is_named(corners, dtype):
    boxes = torch.tensor([[0.0, 0, 100, 80], [10, 10, 60, 90], corners], dtype=dtype)
    with pytest.raises(ValueError, match=r"boxes\[2\]"):
        mk.region_boxes(boxes, torch.zeros(3, dtype=torch.bool), 14, 2)


@pytest.mark.parametrize(
    "corners, dtype",
    [([-3e38, 0.0, 3e38, 1.0], torch.float32), ([-6e4, 0.0, 6e4, 1.0], torch.float16)],
)
def test_a_huge_valid_box_is_accepted(corners, dtype):
    # its width overflows the dtype, which must not make the cheap check refuse it
    boxes = torch.tensor([corners], dtype=dtype)
    assert torch.isinf(boxes[:, 2] - boxes[:, 0]).all()
    mk.region_boxes(boxes, torch.zeros(1, dtype=torch.bool), 14, 2)
