"""Bad input to the geometry ops: a ValueError/TypeError that names the argument."""

import math

import pytest
import torch

import mgc_kernels as mk

BOXES = torch.tensor([[0.0, 0, 100, 80], [10, 10, 60, 90]])
FLIPS = torch.tensor([False, True])


def call(op, **bad):
    args = dict(boxes1=BOXES, flips1=FLIPS, boxes2=BOXES.flip(0), flips2=FLIPS, grid=14, cell=2)
    args.update(bad)
    if op == "region_boxes":
        return mk.region_boxes(args["boxes1"], args["flips1"], args["grid"], args["cell"])
    fn = mk.correspondence if op == "correspondence" else mk.sample_pairs
    extra = {
        k: v for k, v in args.items() if k in ("metric", "k", "method", "strides", "view_size")
    }
    return fn(
        args["boxes1"],
        args["flips1"],
        args["boxes2"],
        args["flips2"],
        args["grid"],
        args["cell"],
        **extra,
    )


OPS = ["region_boxes", "correspondence", "sample_pairs"]
BAD_VIEW_1 = [
    (dict(boxes1=BOXES[:, :3]), ValueError, "boxes"),
    (dict(boxes1=BOXES[0]), ValueError, "boxes"),
    (dict(boxes1=BOXES.long()), TypeError, "boxes"),
    (dict(boxes1=BOXES.tolist()), TypeError, "boxes"),
    (
        dict(boxes1=torch.tensor([[0.0, 0, 0, 80], [10, 10, 60, 90]])),
        ValueError,
        "boxes",
    ),  # zero width
    (
        dict(boxes1=torch.tensor([[0.0, 50, 100, 20], [10, 10, 60, 90]])),
        ValueError,
        "boxes",
    ),  # y1 < y0
    (dict(boxes1=torch.tensor([[0.0, 0, math.nan, 80], [10, 10, 60, 90]])), ValueError, "boxes"),
    (dict(boxes1=torch.tensor([[0.0, 0, math.inf, 80], [10, 10, 60, 90]])), ValueError, "boxes"),
    (dict(flips1=FLIPS.float()), TypeError, "flips"),
    (dict(flips1=FLIPS[:1]), ValueError, "flips"),
    (dict(flips1=FLIPS.to("meta")), ValueError, "flips"),
    (dict(cell=3), ValueError, "cell must divide grid"),
    (dict(cell=0), ValueError, "cell"),
    (dict(grid=14.0), ValueError, "grid"),
]
BAD_TWO_VIEWS = [
    (dict(boxes2=BOXES[:1]), ValueError, "boxes2"),
    (dict(flips2=FLIPS[:1]), ValueError, "flips2"),
    (dict(boxes2=BOXES.double()), TypeError, "boxes2"),
    (dict(boxes2=BOXES.to("meta")), ValueError, "boxes2"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad, error, match", BAD_VIEW_1)
def test_bad_view(op, bad, error, match):
    with pytest.raises(error, match=match):
        call(op, **bad)


@pytest.mark.parametrize("op", OPS[1:])
@pytest.mark.parametrize("bad, error, match", BAD_TWO_VIEWS)
def test_bad_second_view(op, bad, error, match):
    with pytest.raises(error, match=match):
        call(op, **bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(metric="dice"), "metric"),
    ],
)
def test_bad_metric(bad, match):
    with pytest.raises(ValueError, match=match):
        call("correspondence", **bad)


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
