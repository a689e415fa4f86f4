"""correspondence: known answers, properties, and bad input (a ValueError/TypeError that names the
argument)."""

import pytest
import torch
from hypothesis import given

import mgc_kernels as mk
from _geometry import BAD_TWO_VIEWS, BAD_VIEW_1, CELLS, FULL, call, crop_pairs, views

# ----------------------------------------------------------------------------- known answers


def test_identical_views_match_region_to_itself():
    b, f = views(FULL)
    for metric, diag in (("mgc", 0.5), ("iou", 1.0), ("ioa", 1.0)):
        w = mk.correspondence(b, f, b, f, grid=14, cell=1, metric=metric)[0]
        assert torch.allclose(w, diag * torch.eye(196, dtype=w.dtype))


def test_identical_views_one_flipped_match_mirrored_region():
    b, f1 = views(FULL)
    f2 = torch.tensor([True])
    w = mk.correspondence(b, f1, b, f2, grid=14, cell=2)[0]
    n = 7
    mirror = torch.tensor([r * n + (n - 1 - c) for r in range(n) for c in range(n)])
    expected = torch.zeros(49, 49, dtype=w.dtype)
    expected[torch.arange(49), mirror] = 0.5
    assert torch.allclose(w, expected)


def test_disjoint_and_touching_views_have_no_correspondence():
    b1, f1 = views((0, 0, 100, 100, False), (0, 0, 100, 100, False))
    b2, f2 = views((150, 150, 250, 250, False), (100, 0, 200, 100, True))  # far; touching edge
    for metric in ("mgc", "iou", "ioa"):
        assert mk.correspondence(b1, f1, b2, f2, 14, 1, metric).abs().sum() == 0


def test_view_inside_the_other():
    # view 2 is the top-left quarter of view 1: at cell 7 (2 x 2 regions) view-1 region 0 is
    # exactly view 2, so it contains all four 56 x 56 view-2 regions.
    b1, f1 = views(FULL)
    b2, f2 = views((0, 0, 112, 112, False))
    # |a & b| = 56*56 = 3136, |a| = 112*112 = 12544, |b| = 3136
    for metric, value in (
        ("mgc", 3136 / (12544 + 3136)),
        ("iou", 3136 / 12544),
        ("ioa", 3136 / 12544),
    ):
        w = mk.correspondence(b1, f1, b2, f2, 14, 7, metric)[0]
        expected = torch.zeros(4, 4, dtype=w.dtype)
        expected[0] = value
        assert torch.allclose(w, expected)
    # from the small view's side, ioa is over the small region: fully inside, 1
    w = mk.correspondence(b2, f2, b1, f1, 14, 7, "ioa")[0]
    assert torch.allclose(w[:, 0], torch.ones(4, dtype=w.dtype)) and w[:, 1:].sum() == 0


def test_non_square_crops_half_overlap():
    # 2:1 crops shifted by half their width: view-1 column 1 is view-2 column 0 exactly.
    b1, f1 = views((0, 0, 280, 140, False))
    b2, f2 = views((140, 0, 420, 140, False))
    w = mk.correspondence(b1, f1, b2, f2, 14, 7)[0]
    expected = torch.zeros(4, 4, dtype=w.dtype)
    expected[1, 0] = expected[3, 2] = 0.5
    assert torch.allclose(w, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accepts_low_precision_boxes(dtype):
    b, f = views((0, 0, 128, 96, False), (16, 8, 112, 96, True))
    w = mk.correspondence(b.to(dtype), f, b.flip(0).to(dtype), f.flip(0), 14, 2)
    assert w.dtype == dtype
    exact = mk.correspondence(b, f, b.flip(0), f.flip(0), 14, 2)
    assert torch.allclose(w.double(), exact, atol=1e-2)


# ----------------------------------------------------------------------------- properties


@given(crop_pairs(), CELLS)
def test_correspondence_is_symmetric_and_bounded(v, cell):
    (b1, f1), (b2, f2) = v
    for metric in ("mgc", "iou"):
        w12 = mk.correspondence(b1, f1, b2, f2, 14, cell, metric)
        w21 = mk.correspondence(b2, f2, b1, f1, 14, cell, metric)
        assert torch.allclose(w12, w21.transpose(1, 2), rtol=0, atol=1e-12)
    w = mk.correspondence(b1, f1, b2, f2, 14, cell)
    assert w.min() >= 0 and w.max() <= 0.5 + 1e-12


@given(crop_pairs(), CELLS)
def test_intersections_sum_to_the_region_inside_the_overlap(v, cell):
    (b1, f1), (b2, f2) = v
    n = 14 // cell
    w = mk.correspondence(b1, f1, b2, f2, 14, cell)
    area1 = ((b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1]) / n**2)[:, None, None]
    area2 = ((b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1]) / n**2)[:, None, None]
    inter = (w * (area1 + area2)).sum(2)  # over all view-2 regions
    r = mk.region_boxes(b1, f1, 14, cell)
    dx = torch.minimum(r[..., 2], b2[:, None, 2]) - torch.maximum(r[..., 0], b2[:, None, 0])
    dy = torch.minimum(r[..., 3], b2[:, None, 3]) - torch.maximum(r[..., 1], b2[:, None, 1])
    inside = dx.clamp_min(0) * dy.clamp_min(0)
    assert torch.allclose(inter, inside, rtol=1e-9, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, error, match", BAD_VIEW_1)
def test_bad_view(bad, error, match):
    with pytest.raises(error, match=match):
        call("correspondence", **bad)


@pytest.mark.parametrize("bad, error, match", BAD_TWO_VIEWS)
def test_bad_second_view(bad, error, match):
    with pytest.raises(error, match=match):
        call("correspondence", **bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(metric="dice"), "metric"),
    ],
)
def test_bad_metric(bad, match):
    with pytest.raises(ValueError, match=match):
        call("correspondence", **bad)
