"""region_boxes, correspondence and sample_pairs: known answers, properties, and the released
sampling rule re-implemented independently (benchmarks/released_mgc.py)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from benchmarks import released_mgc as official_mgc


def views(*rows):
    """Boxes and flips of a batch: rows of (x0, y0, x1, y1, flipped)."""
    boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float64)
    return boxes, torch.tensor([bool(r[4]) for r in rows])


FULL = (0, 0, 224, 224, False)


# ----------------------------------------------------------------------------- known answers


def test_region_boxes_row_major_and_flipped():
    boxes, flips = views((10, 20, 110, 220, False), (10, 20, 110, 220, True))
    r = mk.region_boxes(boxes, flips, grid=14, cell=7)
    expected = torch.tensor(
        [[10, 20, 60, 120], [60, 20, 110, 120], [10, 120, 60, 220], [60, 120, 110, 220]],
        dtype=torch.float64,
    )
    assert torch.equal(r[0], expected)
    assert torch.equal(r[1], expected[[1, 0, 3, 2]])  # columns mirrored, rows kept


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
    pairs = mk.sample_pairs(b1, f1, b2, f2, 14, 1, k=10)
    for t in pairs:
        assert t.abs().sum() == 0  # padding (0, 0, 0) only


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
    pairs = mk.sample_pairs(b1, f1, b2, f2, 14, 7, k=2)
    assert sorted(zip(pairs.idx1[0].tolist(), pairs.idx2[0].tolist())) == [(1, 0), (3, 2)]
    assert torch.allclose(pairs.weight, torch.full((1, 2), 0.5, dtype=torch.float64))


def test_identical_views_official_strides():
    # IoU 1: row stride clip(12, 2, 8) = 8, column stride clip(8, 2, 6) = 6 at cell 1, so rows
    # 0, 8 and columns 0, 6, 12 are visited: 6 pairs (region, itself) of weight 0.5, 4 pads.
    b, f = views(FULL)
    pairs = mk.sample_pairs(b, f, b, f, 14, 1, k=10)
    visited = [r * 14 + c for r in (0, 8) for c in (0, 6, 12)]
    assert pairs.idx1[0].tolist() == visited + [0] * 4
    assert pairs.idx2[0].tolist() == visited + [0] * 4
    assert pairs.weight[0].tolist() == [0.5] * 6 + [0.0] * 4


def test_topk_and_all_methods():
    b, f = views(FULL)
    top = mk.sample_pairs(b, f, b, f, 14, 1, k=10, method="topk")
    assert top.idx1[0].tolist() == list(range(10)) and torch.all(top.weight == 0.5)
    every = mk.sample_pairs(b, f, b, f, 14, 2, method="all")
    assert every.idx1.shape == (1, 49) and torch.equal(every.idx1[0], every.idx2[0])
    assert sorted(every.idx1[0].tolist()) == list(range(49))


# ----------------------------------------------------------------------------- properties


@st.composite
def crop_pairs(draw, batch=st.integers(1, 4), source=320):
    """Integer crop boxes (as the two-view transform makes) of a ``source``-pixel image."""
    rows = []
    for _ in range(draw(batch)):
        row = []
        for _view in range(2):
            x0, y0 = draw(st.integers(0, source - 8)), draw(st.integers(0, source - 8))
            x1, y1 = draw(st.integers(x0 + 4, source)), draw(st.integers(y0 + 4, source))
            row.append((x0, y0, x1, y1, draw(st.booleans())))
        rows.append(row)
    return views(*[r[0] for r in rows]), views(*[r[1] for r in rows])


CELLS = st.sampled_from([1, 2, 7, 14])


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


@given(crop_pairs(), CELLS)
def test_region_boxes_tile_the_crop(v, cell):
    (b1, f1), _ = v
    r = mk.region_boxes(b1, f1, 14, cell)
    area = ((r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])).sum(1)
    assert torch.allclose(area, (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1]))
    assert torch.all(r[..., 0] >= b1[:, None, 0]) and torch.all(r[..., 2] <= b1[:, None, 2])


# ----------------------------------------------------------------------------- the released rule

OFFICIAL = [(cell, official_mgc.PAIRS[cell], *official_mgc.RULES[cell]) for cell in (1, 2, 7)]
REAL = 1e-6  # real overlaps of integer crops of a <= 320 px image are far above this; the
# released float32 arithmetic adds slivers below it where cell edges coincide


def as_sets(idx1, idx2, weight):
    return {(i, j): w for i, j, w in zip(idx1, idx2, weight) if w > REAL}


@pytest.mark.parametrize("cell, k, rows, cols", OFFICIAL)
@given(v=crop_pairs(batch=st.just(3)))
def test_mgc_candidates_equal_the_released_rule(cell, k, rows, cols, v):
    """With k large enough to keep every candidate, the library's pairs are exactly the pairs the
    released per-sample loops visit (up to float32 slivers of rounding below REAL)."""
    (b1, f1), (b2, f2) = v
    n = 14 // cell
    lib = mk.sample_pairs(b1, f1, b2, f2, 14, cell, k=n**4)
    for b in range(len(b1)):
        off = official_mgc.candidate_pairs(
            b1[b].tolist(),
            b2[b].tolist(),
            bool(f1[b]),
            bool(f2[b]),
            n,
            row_rule=rows,
            col_rule=cols,
        )
        expected = as_sets(*zip(*off)) if off else {}
        got = as_sets(lib.idx1[b].tolist(), lib.idx2[b].tolist(), lib.weight[b].tolist())
        assert got.keys() == expected.keys()
        for key, w in got.items():
            assert w == pytest.approx(expected[key], rel=1e-4)


@pytest.mark.parametrize("cell, k, rows, cols", OFFICIAL)
@given(v=crop_pairs(batch=st.just(3)))
def test_mgc_top_k_equals_the_released_rule(cell, k, rows, cols, v):
    (b1, f1), (b2, f2) = v
    n = 14 // cell
    lib = mk.sample_pairs(b1, f1, b2, f2, 14, cell, k=k)
    assert lib.idx1.shape == (len(b1), k)
    for b in range(len(b1)):
        off = official_mgc.sample_pairs(
            b1[b].tolist(),
            b2[b].tolist(),
            bool(f1[b]),
            bool(f2[b]),
            n,
            k,
            row_rule=rows,
            col_rule=cols,
        )
        off_w = [w if w > REAL else 0.0 for _, _, w in off]
        assert lib.weight[b].tolist() == pytest.approx(off_w, rel=1e-4)
        all_pairs = official_mgc.candidate_pairs(
            b1[b].tolist(),
            b2[b].tolist(),
            bool(f1[b]),
            bool(f2[b]),
            n,
            row_rule=rows,
            col_rule=cols,
        )
        cut = sorted((w for *_, w in all_pairs if w > REAL), reverse=True)
        if len(cut) <= k or cut[k - 1] > cut[k] * (1 + 1e-4):  # no tie across the cut
            got = as_sets(lib.idx1[b].tolist(), lib.idx2[b].tolist(), lib.weight[b].tolist())
            assert got.keys() == as_sets(*zip(*off)).keys()
        pads = lib.weight[b] == 0
        assert torch.all(lib.idx1[b][pads] == 0) and torch.all(lib.idx2[b][pads] == 0)


def test_sample_pairs_ties_follow_visiting_order():
    # identical unflipped views at cell 7: four pairs of equal weight, visited row-major
    b, f = views(FULL)
    pairs = mk.sample_pairs(b, f, b, f, 14, 7, k=4)
    assert pairs.idx1[0].tolist() == [0, 1, 2, 3]
    flipped = torch.tensor([True])
    pairs = mk.sample_pairs(b, flipped, b, flipped, 14, 7, k=4)
    assert pairs.idx1[0].tolist() == [1, 0, 3, 2]  # unflipped columns first


def test_pairs_gather_selects_rows():
    b, f = views(FULL, (0, 0, 224, 224, True))
    pairs = mk.sample_pairs(b, f, b, f, 14, 7, k=2)
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    g1, g2 = pairs.gather(x, x + 100)
    for b_ in range(2):
        for j in range(2):
            assert torch.equal(g1[b_, j], x[b_, pairs.idx1[b_, j]])
            assert torch.equal(g2[b_, j], x[b_, pairs.idx2[b_, j]] + 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_geometry_accepts_low_precision_boxes(dtype):
    b, f = views((0, 0, 128, 96, False), (16, 8, 112, 96, True))
    w = mk.correspondence(b.to(dtype), f, b.flip(0).to(dtype), f.flip(0), 14, 2)
    assert w.dtype == dtype
    exact = mk.correspondence(b, f, b.flip(0), f.flip(0), 14, 2)
    assert torch.allclose(w.double(), exact, atol=1e-2)
    assert mk.sample_pairs(b.to(dtype), f, b.to(dtype), f, 14, 2).weight.dtype == dtype


@pytest.mark.parametrize("view_size", [224.0, 0.1, 96, 1 / 3, 3.4e38])
def test_view_size_is_rounded_to_float32(view_size):
    """The released code holds the view size in float32 tensors; so do all backends."""
    from mgc_kernels.ops.sample_pairs import view_size_float32

    assert view_size_float32(view_size) == torch.tensor(view_size, dtype=torch.float32).item()


def collapsed_crop():
    """A crop one float32 step wide at x = 1e6: at grid 14 its cells round to zero width except
    every 14th (rows of one column), whose mgc weight 0/0 is NaN for the collapsed ones."""
    return torch.tensor([[1e6, 0, 1e6 + 0.0625, 1]]), torch.tensor([False])


def test_cells_collapsed_by_rounding_are_not_pairs():
    boxes, flips = collapsed_crop()
    assert mk.correspondence(boxes, flips, boxes, flips, 14, 1).isnan().any()
    for method, k in (("topk", 5), ("all", 14)):  # 14 cells keep an area: one column
        pairs = mk.sample_pairs(boxes, flips, boxes, flips, 14, 1, 5, method, backend="torch")
        assert pairs.weight.shape == (1, k) and (pairs.weight == 0.5).all()
        assert torch.equal(pairs.idx1, pairs.idx2)
