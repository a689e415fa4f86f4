"""Views (crop boxes and flips) that the tests of region_boxes, correspondence and sample_pairs
share, on every backend: known batches, hypothesis strategies, the released sizes, the bad
arguments all three ops refuse, and the bit-for-bit comparison of a fast backend."""

import math

import torch
from hypothesis import strategies as st

import mgc_kernels as mk
from mgc_kernels.transforms import sample_view_boxes


def views(*rows):
    """Boxes and flips of a batch: rows of (x0, y0, x1, y1, flipped)."""
    boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float64)
    return boxes, torch.tensor([bool(r[4]) for r in rows])


FULL = (0, 0, 224, 224, False)


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


@st.composite
def float_views(draw, batch=st.integers(1, 3), fractional=st.booleans()):
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

# boxes in the float dtypes the ops take: low precision rounds weights into ties, which must rank
# as in the reference
BOX_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def boxes_as(v, dtype):
    b1, f1, b2, f2 = v
    return b1.to(dtype), f1, b2.to(dtype), f2


def released_views(batch=256, seed=0):
    """MGC's two views (``sample_view_boxes``) of ``batch`` 480 x 640 images, maybe flipped, on the
    CPU."""
    gen = torch.Generator().manual_seed(seed)
    boxes = [sample_view_boxes(480, 640, generator=gen) for _ in range(batch)]
    flips = torch.rand(2, batch, generator=gen) < 0.5
    return (
        torch.stack([b[0] for b in boxes]),
        flips[0],
        torch.stack([b[1] for b in boxes]),
        flips[1],
    )


def collapsed_crop():
    """A crop one float32 step wide at x = 1e6: at grid 14 its cells round to zero width except
    every 14th (rows of one column), whose mgc weight 0/0 is NaN for the collapsed ones."""
    return torch.tensor([[1e6, 0, 1e6 + 0.0625, 1]]), torch.tensor([False])


def same(fast, reference):
    for f, r in zip(fast, reference):
        assert f.dtype == r.dtype and torch.equal(f, r)


# ----------------------------------------------------------------------------- bad arguments

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
