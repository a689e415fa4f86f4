"""sample_pairs: known answers, the released sampling rule re-implemented independently
(benchmarks/released_mgc.py), and bad input (a ValueError/TypeError that names the argument)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _geometry import BAD_TWO_VIEWS, BAD_VIEW_1, FULL, call, collapsed_crop, crop_pairs, views
from benchmarks import released_mgc as official_mgc

# ----------------------------------------------------------------------------- known answers


def test_disjoint_and_touching_views_have_no_pairs():
    b1, f1 = views((0, 0, 100, 100, False), (0, 0, 100, 100, False))
    b2, f2 = views((150, 150, 250, 250, False), (100, 0, 200, 100, True))  # far; touching edge
    pairs = mk.sample_pairs(b1, f1, b2, f2, 14, 1, k=10)
    for t in pairs:
        assert t.abs().sum() == 0  # padding (0, 0, 0) only


def test_non_square_crops_half_overlap():
    # 2:1 crops shifted by half their width: view-1 column 1 is view-2 column 0 exactly.
    b1, f1 = views((0, 0, 280, 140, False))
    b2, f2 = views((140, 0, 420, 140, False))
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
def test_accepts_low_precision_boxes(dtype):
    b, f = views((0, 0, 128, 96, False), (16, 8, 112, 96, True))
    assert mk.sample_pairs(b.to(dtype), f, b.to(dtype), f, 14, 2).weight.dtype == dtype


@pytest.mark.parametrize("view_size", [224.0, 0.1, 96, 1 / 3, 3.4e38])
def test_view_size_is_rounded_to_float32(view_size):
    """The released code holds the view size in float32 tensors; so do all backends."""
    from mgc_kernels.ops.sample_pairs import view_size_float32

    assert view_size_float32(view_size) == torch.tensor(view_size, dtype=torch.float32).item()


def test_cells_collapsed_by_rounding_are_not_pairs():
    boxes, flips = collapsed_crop()
    assert mk.correspondence(boxes, flips, boxes, flips, 14, 1).isnan().any()
    for method, k in (("topk", 5), ("all", 14)):  # 14 cells keep an area: one column
        pairs = mk.sample_pairs(boxes, flips, boxes, flips, 14, 1, 5, method, backend="torch")
        assert pairs.weight.shape == (1, k) and (pairs.weight == 0.5).all()
        assert torch.equal(pairs.idx1, pairs.idx2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, error, match", BAD_VIEW_1)
def test_bad_view(bad, error, match):
    with pytest.raises(error, match=match):
        call("sample_pairs", **bad)


@pytest.mark.parametrize("bad, error, match", BAD_TWO_VIEWS)
def test_bad_second_view(bad, error, match):
    with pytest.raises(error, match=match):
        call("sample_pairs", **bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(k=0), "k must"),
        (dict(k=2.5), "k must"),
        (dict(method="random"), "method"),
        (dict(strides=((12, 0, 8), (8, 2, 6))), "strides"),
        (dict(strides=(12, 2, 8)), "strides"),
        (dict(view_size=0), "view_size"),
        (dict(view_size=math.inf), "view_size"),
        (dict(view_size=1e39), "view_size"),
    ],
)
def test_bad_sampling_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        call("sample_pairs", **bad)
