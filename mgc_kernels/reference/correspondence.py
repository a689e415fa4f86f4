"""Overlap weights between the regions of two views (the executable spec)."""

from __future__ import annotations

import torch

from .region_boxes import region_corners


def box_metric(
    a: tuple[torch.Tensor, ...],
    b: tuple[torch.Tensor, ...],
    area_a: torch.Tensor,
    area_b: torch.Tensor,
    metric: str,
) -> torch.Tensor:
    """``metric`` between boxes ``a`` and ``b`` given as broadcastable (x0, y0, x1, y1) tuples.

    ``mgc`` is ``|a & b| / (|a| + |b|)`` (MGC's weight, 0 .. 0.5; not IoU), ``iou`` the usual
    intersection over union, ``ioa`` the intersection over the area of ``a``.
    """
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp_min(0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp_min(0)
    inter = w * h
    if metric == "mgc":
        return inter / (area_a + area_b)
    if metric == "iou":
        return inter / ((area_a + area_b) - inter)
    return inter / area_a.expand_as(inter)


def area(box: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (box[2] - box[0]) * (box[3] - box[1])


def correspondence(boxes1, flips1, boxes2, flips2, n: int, metric: str) -> torch.Tensor:
    """``[B, n*n, n*n]``: ``metric`` between every region of view 1 and every region of view 2,
    computed from the region boxes alone (so it equals the dense-mode targets bit for bit)."""
    r1 = [t.unsqueeze(2) for t in region_corners(boxes1, flips1, n)]
    r2 = [t.unsqueeze(1) for t in region_corners(boxes2, flips2, n)]
    return box_metric(r1, r2, area(r1), area(r2), metric).to(boxes1.dtype)
