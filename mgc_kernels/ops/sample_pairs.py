"""``sample_pairs``: the sparse region pairs that MGC contrasts, per image and granularity."""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch

from .. import _checks, backends
from ..options import SAMPLE_METHODS
from ..reference import sample_pairs as reference

backends.register("sample_pairs", "torch")(reference.sample_pairs)
backends.register_lazy("sample_pairs", "triton", "mgc_kernels.triton.sample_pairs:sample_pairs")
backends.register_lazy("sample_pairs", "native", "mgc_kernels.native:sample_pairs")

# The released code's stride rule per cell size (at grid 14): ((row ratio, min, max),
# (column ratio, min, max)), stride = clip(int(IoU * ratio), min, max). Other cells visit every
# overlapping region, as the released code does for cell 7.
OFFICIAL_STRIDES = {1: ((12, 2, 8), (8, 2, 6)), 2: ((8, 2, 4), (4, 1, 3))}
EVERY_REGION = ((1, 1, 1), (1, 1, 1))


class Pairs(NamedTuple):
    """Sampled region pairs: ``idx1``/``idx2`` ``[B, k]`` long region indices into view 1/2,
    ``weight`` ``[B, k]`` their ``mgc`` overlap weight; padding is ``(0, 0, 0)``."""

    idx1: torch.Tensor
    idx2: torch.Tensor
    weight: torch.Tensor

    def gather(self, regions1: torch.Tensor, regions2: torch.Tensor):
        """``(regions1[b, idx1[b]], regions2[b, idx2[b]])``: the paired rows of two
        ``[B, R, C]`` region tensors (``R`` regions per view, e.g. pooled tokens), each
        ``[B, k, C]``."""
        return take(regions1, self.idx1, "regions1"), take(regions2, self.idx2, "regions2")


def take(regions: torch.Tensor, idx: torch.Tensor, name: str) -> torch.Tensor:
    _checks.tensor(name, regions, ndim=3, kind=" ([B, R, C] region features)")
    _checks.dim_size(name, regions, 0, idx.shape[0], "the batch size of the pairs")
    return regions.gather(1, idx[:, :, None].expand(-1, -1, regions.shape[2]))


@torch.library.custom_op("mgc_kernels::sample_pairs", mutates_args=())
def _sample_pairs(
    boxes1: torch.Tensor,
    flips1: torch.Tensor,
    boxes2: torch.Tensor,
    flips2: torch.Tensor,
    per_side: int,
    k: int,
    method: str,
    view_size: float,
    strides: list[float],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.call(
        "sample_pairs",
        backend,
        boxes1,
        flips1,
        boxes2,
        flips2,
        per_side,
        k,
        method,
        view_size,
        strides[:3],
        strides[3:],
    )


@_sample_pairs.register_fake
def _(boxes1, flips1, boxes2, flips2, per_side, k, method, view_size, strides, backend):
    if method == "all":
        k = torch.library.get_ctx().new_dynamic_size()
    b = boxes1.shape[0]
    idx = boxes1.new_empty(b, k, dtype=torch.long)
    return idx, torch.empty_like(idx), boxes1.new_empty(b, k)


def check_strides(strides) -> list[float]:
    """Flatten a ``((ratio, min, max), (ratio, min, max))`` rule for rows and columns, with
    integer bounds ``1 <= min <= max``."""
    try:
        (row_ratio, row_min, row_max), (col_ratio, col_min, col_max) = strides
    except (TypeError, ValueError):
        raise ValueError(
            "strides must be ((row_ratio, row_min, row_max), (col_ratio, col_min, "
            f"col_max)), got {strides!r}"
        ) from None
    row_min = _checks.integer("strides row_min", row_min, 1)
    col_min = _checks.integer("strides col_min", col_min, 1)
    return [
        _checks.real("strides row_ratio", row_ratio),
        float(row_min),
        float(_checks.integer("strides row_max", row_max, row_min)),
        _checks.real("strides col_ratio", col_ratio),
        float(col_min),
        float(_checks.integer("strides col_max", col_max, col_min)),
    ]


def view_size_float32(view_size) -> float:
    """The view size as the released code's float32 tensors hold it; every backend uses it."""
    largest = torch.finfo(torch.float32).max
    view_size = _checks.real("view_size", view_size, 0, largest, low_open=True)
    return struct.unpack("f", struct.pack("f", view_size))[0]


def sample_pairs(
    boxes1: torch.Tensor,
    flips1: torch.Tensor,
    boxes2: torch.Tensor,
    flips2: torch.Tensor,
    grid: int = 14,
    cell: int = 1,
    k: int = 10,
    method: str = "mgc",
    *,
    view_size: float = 224.0,
    strides=None,
    backend: str | None = None,
) -> Pairs:
    """The ``k`` best region pairs of two views of each image, as MGC samples them.

    ``method="mgc"`` is the released rule: view-1 regions inside the crops' overlap, visited with a
    row/column stride that grows with the crops' IoU, each paired with every view-2 region it
    overlaps; the ``k`` pairs with the largest ``|a & b| / (|a| + |b|)`` are kept. ``"topk"``
    keeps the best ``k`` of all pairs; ``"all"`` keeps every overlapping pair (``k`` becomes the
    largest count in the batch). Pairs are sorted by weight, ties in the released visiting order;
    missing pairs are padded with ``(0, 0, 0)``.

    Args:
        boxes1, flips1, boxes2, flips2: crop boxes ``[B, 4]`` (x0, y0, x1, y1, source pixels) and
            flips ``[B]`` of the two views.
        grid, cell: the token grid and the pooling block; regions are indexed as in
            :func:`region_boxes`.
        k: pairs per image (ignored for ``"all"``).
        view_size: the side of a view in pixels; the released rule measures the overlap in view
            pixels, so only the rounding of boundary cases depends on it.
        strides: ``((row_ratio, row_min, row_max), (col_ratio, col_min, col_max))`` for ``"mgc"``;
            default: the released rule for cells 1 and 2, every region for other cells.
    Returns:
        :class:`Pairs` ``(idx1, idx2, weight)``, each ``[B, k]``.
    """
    per_side = _checks.grid_cell(grid, cell)
    _checks.choice("method", method, SAMPLE_METHODS)
    k = _checks.integer("k", k, 1)
    view_size = view_size_float32(view_size)
    rule = check_strides(OFFICIAL_STRIDES.get(cell, EVERY_REGION) if strides is None else strides)
    _checks.views(boxes1, flips1, boxes2, flips2)
    backend = backends.resolve("sample_pairs", backend, boxes1.device, boxes1.dtype)
    pairs = _sample_pairs(
        boxes1, flips1, boxes2, flips2, per_side, k, method, view_size, rule, backend
    )
    return Pairs(*pairs)
