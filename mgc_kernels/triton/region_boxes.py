"""Region boxes of a pooled token grid, and the in-register geometry the other Triton geometry
kernels share.

Every value is computed with the reference's operations in the reference's order
(``reference/region_boxes.py``, ``reference/correspondence.py``): cell edges
``(lo * (n - k) + hi * k) / n`` with a correctly rounded division, then one rounding per
operation. Kernels are launched with ``enable_fp_fusion=False`` so that no multiply-add is
contracted into an FMA; the results are then bit-identical to the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def cell_edge(lo, hi, k, n):
    """Edge ``k`` of ``n`` equal cells from ``lo`` to ``hi`` (fp32)."""
    kf = k.to(tl.float32)
    return tl.math.div_rn(lo * (n - kf) + hi * kf, tl.cast(n, tl.float32))


@triton.jit
def region_corners(box_ptr, flip_ptr, image, region, n):
    """(x0, y0, x1, y1) of token-order ``region`` (row-major, flip-aware) of view ``image``."""
    base = box_ptr + image.to(tl.int64) * 4
    bx0, by0 = tl.load(base + 0).to(tl.float32), tl.load(base + 1).to(tl.float32)
    bx1, by1 = tl.load(base + 2).to(tl.float32), tl.load(base + 3).to(tl.float32)
    flipped = tl.load(flip_ptr + image) != 0
    row, col = region // n, region % n
    col = tl.where(flipped, n - 1 - col, col)  # the crop column a flipped token shows
    return (
        cell_edge(bx0, bx1, col, n),
        cell_edge(by0, by1, row, n),
        cell_edge(bx0, bx1, col + 1, n),
        cell_edge(by0, by1, row + 1, n),
    )


@triton.jit
def box_metric(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1, METRIC: tl.constexpr):
    """``"mgc"``: |a&b| / (|a|+|b|); ``"iou"``; ``"ioa"``: |a&b| / |a|, for boxes that broadcast
    against each other (``reference/correspondence.py::box_metric``, divisions correctly
    rounded)."""
    w = tl.maximum(tl.minimum(ax1, bx1) - tl.maximum(ax0, bx0), 0.0)
    h = tl.maximum(tl.minimum(ay1, by1) - tl.maximum(ay0, by0), 0.0)
    inter = w * h
    area_a = (ax1 - ax0) * (ay1 - ay0)
    if METRIC == "ioa":
        return tl.math.div_rn(inter, tl.broadcast_to(area_a, inter.shape))
    areas = area_a + (bx1 - bx0) * (by1 - by0)
    if METRIC == "iou":
        areas = areas - inter
    return tl.math.div_rn(inter, areas)


@triton.jit(do_not_specialize=["n"])
def region_boxes_kernel(box_ptr, flip_ptr, out_ptr, n, total, BLOCK: tl.constexpr):
    item = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = item < total
    image, region = item // (n * n), item % (n * n)
    x0, y0, x1, y1 = region_corners(box_ptr, flip_ptr, tl.where(inside, image, 0), region, n)
    out = out_ptr + item * 4
    tl.store(out + 0, x0, mask=inside)
    tl.store(out + 1, y0, mask=inside)
    tl.store(out + 2, x1, mask=inside)
    tl.store(out + 3, y1, mask=inside)


def geometry_inputs(boxes: torch.Tensor, flips: torch.Tensor):
    """Contiguous fp32 boxes and int8 flips, as the kernels read them."""
    return boxes.float().contiguous(), flips.to(torch.int8).contiguous()


def region_boxes(boxes: torch.Tensor, flips: torch.Tensor, n: int) -> torch.Tensor:
    boxes32, flips8 = geometry_inputs(boxes, flips)
    out = torch.empty(len(boxes), n * n, 4, device=boxes.device, dtype=torch.float32)
    total = out.shape[0] * out.shape[1]
    if total:
        region_boxes_kernel[(triton.cdiv(total, BLOCK),)](
            boxes32, flips8, out, n, total, BLOCK=BLOCK, enable_fp_fusion=False
        )
    return out.to(boxes.dtype)
