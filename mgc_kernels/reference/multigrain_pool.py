"""Average pooling of a token grid at several granularities (the executable spec)."""

from __future__ import annotations

import torch

from .._dtypes import accumulate


def multigrain_pool(tokens: torch.Tensor, grid: int, cells: list[int]) -> list[torch.Tensor]:
    """For each cell size ``c``: ``[B, (grid // c)**2, C]``, the mean of each ``c x c`` block,
    accumulated in fp32 and returned in the tokens' dtype."""
    b, _, ch = tokens.shape
    x = tokens.to(accumulate(tokens.dtype))
    out = []
    for c in cells:
        n = grid // c
        pooled = x.reshape(b, n, c, n, c, ch).mean(dim=(2, 4))
        out.append(pooled.reshape(b, n * n, ch).to(tokens.dtype))
    return out


def multigrain_pool_backward(
    grads: list[torch.Tensor], grid: int, cells: list[int]
) -> torch.Tensor:
    """Gradient w.r.t. the tokens: each block's gradient spread evenly over its ``c x c`` tokens,
    summed over granularities."""
    b, _, ch = grads[0].shape
    total = torch.zeros(b, grid, grid, ch, device=grads[0].device, dtype=accumulate(grads[0].dtype))
    for g, c in zip(grads, cells):
        n = grid // c
        block = g.to(total.dtype).reshape(b, n, 1, n, 1, ch) / (c * c)
        total += block.expand(b, n, c, n, c, ch).reshape(b, grid, grid, ch)
    return total.reshape(b, grid * grid, ch).to(grads[0].dtype)
