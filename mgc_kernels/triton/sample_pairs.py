"""MGC's sparse pair sampling in one launch per granularity: boxes in, ``(idx1, idx2, weight)``
out, the same pairs, weights and tie order as the torch reference.

One program per image. The candidates (view-1 region x view-2 region, in the released visiting
order) are never stored: each of the ``k`` selection rounds re-scans them in registers and keeps
the largest key ``(weight bits, -visit index)`` below the previous round's, so the ``k`` winners
come out best first with ties in visiting order. A non-negative float's bits order like the float,
which makes one int64 max do the whole comparison. ``method="all"`` has a data-dependent ``k``;
it scores with the correspondence kernel and selects with the reference's sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.sample_pairs import select_pairs, unflipped_scores
from .correspondence import correspondence
from .tiles import box_metric, cell_edge, geometry_inputs

BLOCK = 1024
METHOD_IDS = {"mgc": 0, "topk": 1}
WEIGHT_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def overlap_span(lo1, hi1, lo2, hi2, view_size, cell):
    """First and last view-1 cell touched by the crops' overlap along one axis, with the released
    float32 arithmetic (see ``reference.sample_pairs.overlap_span``)."""
    size1 = hi1 - lo1
    o_lo, o_hi = tl.maximum(lo1, lo2), tl.minimum(hi1, hi2)
    start = tl.math.div_rn(o_lo - lo1, size1) * view_size
    end = start + tl.math.div_rn(o_hi - o_lo, size1) * view_size
    start, end = start.to(tl.float64), end.to(tl.float64)
    first = tl.math.floor(start / cell)  # fp64 division is IEEE (div.rn.f64) on GPUs
    last = tl.math.floor(end / cell)
    on_edge = (last * cell == end) | (end > tl.cast(view_size, tl.float64))
    return first.to(tl.int32), (last - on_edge.to(tl.float64)).to(tl.int32)


@triton.jit
def crop_iou32(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1):
    """The crops' IoU as the released code computes it: exact areas, one float32 division."""
    ax0, ay0, ax1, ay1 = (
        ax0.to(tl.float64),
        ay0.to(tl.float64),
        ax1.to(tl.float64),
        ay1.to(tl.float64),
    )
    bx0, by0, bx1, by1 = (
        bx0.to(tl.float64),
        by0.to(tl.float64),
        bx1.to(tl.float64),
        by1.to(tl.float64),
    )
    w = tl.maximum(tl.minimum(ax1, bx1) - tl.maximum(ax0, bx0), 0.0)
    h = tl.maximum(tl.minimum(ay1, by1) - tl.maximum(ay0, by0), 0.0)
    inter = w * h
    union = ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0)) - inter
    return tl.math.div_rn(inter.to(tl.float32), union.to(tl.float32))


@triton.jit
def stride(iou, ratio, lo, hi):
    return tl.minimum(tl.maximum(tl.math.floor(iou * ratio).to(tl.int32), lo), hi)


@triton.jit
def on_stride(i, first, last, step):
    return (i >= first) & (i <= last) & ((i - first) % step == 0)


@triton.jit(do_not_specialize=["n", "k", "row_lo", "row_hi", "col_lo", "col_hi"])
def sample_pairs_kernel(
    box1_ptr,
    flip1_ptr,
    box2_ptr,
    flip2_ptr,
    idx1_ptr,
    idx2_ptr,
    weight_ptr,
    n,
    k,
    view_size,
    row_ratio,
    row_lo,
    row_hi,
    col_ratio,
    col_lo,
    col_hi,
    METHOD: tl.constexpr,
    BLOCK: tl.constexpr,
    WEIGHT: tl.constexpr,
):
    image = tl.program_id(0)
    a = box1_ptr + image.to(tl.int64) * 4
    b = box2_ptr + image.to(tl.int64) * 4
    ax0, ay0, ax1, ay1 = tl.load(a), tl.load(a + 1), tl.load(a + 2), tl.load(a + 3)
    bx0, by0, bx1, by1 = tl.load(b), tl.load(b + 1), tl.load(b + 2), tl.load(b + 3)
    flip1, flip2 = tl.load(flip1_ptr + image) != 0, tl.load(flip2_ptr + image) != 0
    if METHOD == 0:
        cell = tl.cast(view_size, tl.float64) / tl.cast(n, tl.float64)
        row_first, row_last = overlap_span(ay0, ay1, by0, by1, view_size, cell)
        col_first, col_last = overlap_span(ax0, ax1, bx0, bx1, view_size, cell)
        iou = crop_iou32(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1)
        row_step = stride(iou, row_ratio, row_lo, row_hi)
        col_step = stride(iou, col_ratio, col_lo, col_hi)
    regions = n * n
    candidates = regions * regions
    previous = tl.full([], 9223372036854775807, tl.int64)
    out = image.to(tl.int64) * k
    for rank in range(0, k):
        best = tl.full([], -1, tl.int64)
        for start in range(0, candidates, BLOCK):
            visit = start + tl.arange(0, BLOCK)  # visiting order: (i, j) of view 1, (p, q)
            i, j = visit // regions // n, visit // regions % n
            p, q = visit % regions // n, visit % regions % n
            w = box_metric(
                cell_edge(ax0, ax1, j, n),
                cell_edge(ay0, ay1, i, n),
                cell_edge(ax0, ax1, j + 1, n),
                cell_edge(ay0, ay1, i + 1, n),
                cell_edge(bx0, bx1, q, n),
                cell_edge(by0, by1, p, n),
                cell_edge(bx0, bx1, q + 1, n),
                cell_edge(by0, by1, p + 1, n),
                "mgc",
            )
            # ranked as returned, in the boxes' dtype: weights that round to one value tie
            w = w.to(WEIGHT).to(tl.float32)
            valid = (visit < candidates) & (w > 0)
            if METHOD == 0:
                valid &= on_stride(i, row_first, row_last, row_step)
                valid &= on_stride(j, col_first, col_last, col_step)
            key = w.to(tl.int32, bitcast=True).to(tl.int64) * 2147483648 + (2147483647 - visit)
            key = tl.where(valid & (key < previous), key, -1)
            best = tl.maximum(best, tl.max(key, axis=0))
        found = best >= 0
        visit = 2147483647 - (best % 2147483648)
        i, j = visit // regions // n, visit // regions % n
        p, q = visit % regions // n, visit % regions % n
        token1 = i * n + tl.where(flip1, n - 1 - j, j)
        token2 = p * n + tl.where(flip2, n - 1 - q, q)
        w = (best // 2147483648).to(tl.int32).to(tl.float32, bitcast=True)
        tl.store(idx1_ptr + out + rank, tl.where(found, token1, 0).to(tl.int64))
        tl.store(idx2_ptr + out + rank, tl.where(found, token2, 0).to(tl.int64))
        tl.store(weight_ptr + out + rank, tl.where(found, w, 0.0))
        previous = best


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
    if method == "all":
        scores = unflipped_scores(
            correspondence(boxes1, flips1, boxes2, flips2, n, "mgc").float(), flips1, flips2, n
        )
        return select_pairs(scores, flips1, flips2, n, None, boxes1.dtype)
    b1, f1 = geometry_inputs(boxes1, flips1)
    b2, f2 = geometry_inputs(boxes2, flips2)
    idx1 = torch.empty(len(b1), k, device=b1.device, dtype=torch.long)
    idx2 = torch.empty_like(idx1)
    weight = torch.empty(len(b1), k, device=b1.device, dtype=torch.float32)
    if len(b1):
        (row_ratio, row_lo, row_hi), (col_ratio, col_lo, col_hi) = row_rule, col_rule
        sample_pairs_kernel[(len(b1),)](
            b1,
            f1,
            b2,
            f2,
            idx1,
            idx2,
            weight,
            n,
            k,
            float(view_size),
            float(row_ratio),
            int(row_lo),
            int(row_hi),
            float(col_ratio),
            int(col_lo),
            int(col_hi),
            METHOD=METHOD_IDS[method],
            BLOCK=BLOCK,
            WEIGHT=WEIGHT_TYPES[boxes1.dtype],
            enable_fp_fusion=False,
        )
    return idx1, idx2, weight.to(boxes1.dtype)
