"""Sparse region pairs of two views (the executable spec of MGC's sampling rule).

All three methods score every (view-1 region, view-2 region) pair with the ``mgc`` weight
``|a & b| / (|a| + |b|)``, keep the candidates with a positive weight, and return the best ``k``
by weight, ties broken by the released code's visiting order (view-1 row, view-1 column, view-2
row, view-2 column, all in unflipped crop coordinates). They differ in which view-1 regions are
candidates:

- ``mgc``: the official rule. View-1 regions that intersect the overlap of the two crops, visited
  every ``s_r``-th row and ``s_c``-th column from the first overlapping row/column (in unflipped
  coordinates), ``s = clip(int(IoU(crops) * ratio), lo, hi)``. The overlap's extent in view-1
  pixels and the IoU are computed in float32 in the released code's order of operations so that
  the visited rows and columns are bit-for-bit the released ones.
- ``topk``: every view-1 region.
- ``all``: every view-1 region, and ``k`` becomes the largest number of positive pairs in the batch.
"""

from __future__ import annotations

import torch

from .._dtypes import accumulate
from .correspondence import correspondence
from .region_boxes import cell_columns


def overlap_span(lo1, hi1, lo2, hi2, view_size: float, n: int):
    """First and last view-1 cell (unflipped) touched by the crops' overlap along one axis.

    Mirrors the released arithmetic: the overlap's start and length relative to view 1 are
    ``float32((o - lo1) / size1) * S`` and ``float32(len / size1) * S``, their float32 sum is the
    end, and a cell ``P = S / n`` pixels wide counts when the overlap reaches into it.
    """
    f32 = torch.float32
    size1 = (hi1 - lo1).to(f32)
    o_lo, o_hi = torch.maximum(lo1, lo2), torch.minimum(hi1, hi2)
    start = ((o_lo - lo1).to(f32) / size1) * view_size
    end = start + ((o_hi - o_lo).to(f32) / size1) * view_size
    cell = view_size / n
    start, end = start.double(), end.double()
    first = torch.floor(start / cell)
    last = torch.floor(end / cell)
    on_edge = (last * cell == end) | (end > view_size)
    return first.long(), (last - on_edge.double()).long()


def crop_iou32(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """IoU of the two crops as the released code computes it: areas exact, one float32 division."""
    b1, b2 = b1.double(), b2.double()
    w = (torch.minimum(b1[:, 2], b2[:, 2]) - torch.maximum(b1[:, 0], b2[:, 0])).clamp_min(0)
    h = (torch.minimum(b1[:, 3], b2[:, 3]) - torch.maximum(b1[:, 1], b2[:, 1])).clamp_min(0)
    inter = w * h
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    return inter.float() / (area1 + area2 - inter).float()


def strided(first: torch.Tensor, last: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` mask of ``range(first, last + 1, step)`` per batch entry."""
    i = torch.arange(n, device=first.device)
    first, last, step = first[:, None], last[:, None], step[:, None]
    return (i >= first) & (i <= last) & ((i - first) % step == 0)


def stride(iou32: torch.Tensor, rule) -> torch.Tensor:
    ratio, lo, hi = rule
    return torch.floor(iou32 * torch.tensor(ratio, dtype=torch.float32)).long().clamp(lo, hi)


def mgc_visited(boxes1, boxes2, n: int, view_size: float, row_rule, col_rule) -> torch.Tensor:
    """``[B, n, n]`` mask (unflipped rows x columns) of the view-1 regions the official rule
    visits."""
    row_first, row_last = overlap_span(
        boxes1[:, 1], boxes1[:, 3], boxes2[:, 1], boxes2[:, 3], view_size, n
    )
    col_first, col_last = overlap_span(
        boxes1[:, 0], boxes1[:, 2], boxes2[:, 0], boxes2[:, 2], view_size, n
    )
    iou = crop_iou32(boxes1, boxes2)
    rows = strided(row_first, row_last, stride(iou, row_rule), n)
    cols = strided(col_first, col_last, stride(iou, col_rule), n)
    return rows[:, :, None] & cols[:, None, :]


def unflipped_order(flips: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n*n]`` token index of each region in unflipped row-major order (a flip is its own
    inverse, so the token column of unflipped column ``j`` is ``cell_columns[j]``)."""
    rows = torch.arange(n, device=flips.device)[:, None] * n
    return (rows + cell_columns(flips, n)[:, None, :]).reshape(len(flips), n * n)


def unflipped_scores(weights: torch.Tensor, flips1, flips2, n: int) -> torch.Tensor:
    """``[B, n*n, n*n]`` token-order weights permuted to unflipped (visiting) order."""
    regions = n * n
    order1, order2 = unflipped_order(flips1, n), unflipped_order(flips2, n)
    w = weights.gather(1, order1[:, :, None].expand(-1, -1, regions))
    return w.gather(2, order2[:, None, :].expand(-1, regions, -1))


def select_pairs(scores: torch.Tensor, flips1, flips2, n: int, k: int | None, dtype):
    """The ``k`` best positive entries of each row of ``scores`` ``[B, n*n, n*n]`` (unflipped
    order), ties in visiting order, as token indices; ``k=None`` keeps every positive one."""
    batch, regions = len(scores), n * n
    scores = scores.reshape(batch, regions * regions)
    # a cell that float rounding collapses to zero area scores 0/0 = NaN: not a pair (a NaN
    # would sort first)
    scores = torch.where(scores > 0, scores, 0)
    if k is None:
        k = int((scores > 0).sum(1).max()) if batch else 0
    k_kept = min(k, regions * regions)
    top, pos = torch.sort(scores, dim=1, descending=True, stable=True)
    top, pos = top[:, :k_kept], pos[:, :k_kept]
    keep = top > 0
    idx1 = unflipped_order(flips1, n).gather(1, pos // regions).masked_fill(~keep, 0)
    idx2 = unflipped_order(flips2, n).gather(1, pos % regions).masked_fill(~keep, 0)
    weight = top.masked_fill(~keep, 0).to(dtype)
    pad = k - k_kept
    if pad:
        idx1, idx2 = (torch.nn.functional.pad(t, (0, pad)) for t in (idx1, idx2))
        weight = torch.nn.functional.pad(weight, (0, pad))
    return idx1, idx2, weight


def sample_pairs(
    boxes1,
    flips1,
    boxes2,
    flips2,
    n: int,
    k: int,
    method: str,
    view_size: float,
    row_rule,
    col_rule,
):
    """``(idx1, idx2, weight)``, each ``[B, k]``: token indices of paired regions and their
    ``mgc`` weight, best first; missing pairs are padded with ``(0, 0, 0)``."""
    w = correspondence(boxes1, flips1, boxes2, flips2, n, "mgc").to(accumulate(boxes1.dtype))
    scores = unflipped_scores(w, flips1, flips2, n)
    if method == "mgc":
        visited = mgc_visited(boxes1, boxes2, n, view_size, row_rule, col_rule)
        scores = scores.masked_fill(~visited.reshape(len(boxes1), n * n, 1), 0)
    return select_pairs(scores, flips1, flips2, n, None if method == "all" else k, boxes1.dtype)
