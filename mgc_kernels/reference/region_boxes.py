"""Region boxes of a pooled token grid, in source-image pixels (the executable spec)."""

from __future__ import annotations

import torch

from .._dtypes import accumulate


def region_edges(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """``n + 1`` cell edges from ``lo`` to ``hi`` along the last axis, in the accumulation dtype.

    Edge k is computed as ``(lo * (n - k) + hi * k) / n``: for integer-valued boxes (below 2**24
    / n pixels) the numerator is exact, so two views whose cell edges coincide in exact arithmetic
    get bit-identical edges, their intersection is exactly 0 (no slivers of rounding error), and
    every backend that divides correctly rounded gets the same bits.
    """
    dtype = accumulate(lo.dtype)
    k = torch.arange(n + 1, device=lo.device, dtype=dtype)
    lo, hi = lo.to(dtype).unsqueeze(-1), hi.to(dtype).unsqueeze(-1)
    return (lo * (n - k) + hi * k) / n


def cell_columns(flips: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]``: the unflipped crop column shown by each token column of the view.

    Flips happen after cropping, so a flipped view's token column ``c`` shows column ``n-1-c``.
    """
    cols = torch.arange(n, device=flips.device)
    return torch.where(flips.unsqueeze(-1), n - 1 - cols, cols)


def region_corners(boxes: torch.Tensor, flips: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """``(x0, y0, x1, y1)``, each ``[B, n*n]``, of the regions in token (row-major) order."""
    xe = region_edges(boxes[:, 0], boxes[:, 2], n)
    ye = region_edges(boxes[:, 1], boxes[:, 3], n)
    cols = cell_columns(flips, n)
    x0, x1 = xe.gather(1, cols), xe.gather(1, cols + 1)  # [B, n] per token column
    y0, y1 = ye[:, :-1], ye[:, 1:]  # [B, n] per token row
    grid = (x0.unsqueeze(1), y0.unsqueeze(2), x1.unsqueeze(1), y1.unsqueeze(2))
    return tuple(t.expand(-1, n, n).reshape(len(boxes), n * n) for t in grid)


def region_boxes(boxes: torch.Tensor, flips: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n*n, 4]`` boxes of the ``n x n`` regions of each view, in the boxes' dtype."""
    return torch.stack(region_corners(boxes, flips, n), dim=-1).to(boxes.dtype)
