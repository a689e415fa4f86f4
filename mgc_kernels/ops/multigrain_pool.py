"""``multigrain_pool``: average-pool a token grid at several granularities at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks, backends
from ..reference import multigrain_pool as reference

backends.register("multigrain_pool", "torch")(reference.multigrain_pool)
backends.register("multigrain_pool_backward", "torch")(reference.multigrain_pool_backward)
backends.register_lazy(
    "multigrain_pool", "triton", "mgc_kernels.triton.multigrain_pool:multigrain_pool"
)
backends.register_lazy(
    "multigrain_pool_backward",
    "triton",
    "mgc_kernels.triton.multigrain_pool:multigrain_pool_backward",
)
backends.register_lazy("multigrain_pool", "native", "mgc_kernels.native:multigrain_pool")
backends.register_lazy(
    "multigrain_pool_backward", "native", "mgc_kernels.native:multigrain_pool_backward"
)


@torch.library.custom_op("mgc_kernels::multigrain_pool", mutates_args=())
def _multigrain_pool(
    tokens: torch.Tensor, grid: int, cells: list[int], backend: str
) -> list[torch.Tensor]:
    return backends.call("multigrain_pool", backend, tokens, grid, cells)


@_multigrain_pool.register_fake
def _(tokens, grid, cells, backend):
    return [tokens.new_empty(tokens.shape[0], (grid // c) ** 2, tokens.shape[2]) for c in cells]


@torch.library.custom_op("mgc_kernels::multigrain_pool_backward", mutates_args=())
def _multigrain_pool_backward(
    grads: list[torch.Tensor], grid: int, cells: list[int], backend: str
) -> torch.Tensor:
    return backends.call("multigrain_pool_backward", backend, grads, grid, cells)


@_multigrain_pool_backward.register_fake
def _(grads, grid, cells, backend):
    return grads[0].new_empty(grads[0].shape[0], grid * grid, grads[0].shape[2])


def _setup_context(ctx, inputs, output):
    _, ctx.grid, ctx.cells, ctx.backend = inputs


def _backward(ctx, grads):
    grads = [torch.zeros_like(g) if g is None else g.contiguous() for g in grads]
    return _multigrain_pool_backward(grads, ctx.grid, ctx.cells, ctx.backend), None, None, None


_multigrain_pool.register_autograd(_backward, setup_context=_setup_context)


def multigrain_pool(
    tokens: torch.Tensor,
    grid: int = 14,
    cells: Sequence[int] = (1, 2, 7, 14),
    *,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Average-pool ``[B, grid*grid, C]`` patch tokens (no CLS token) into non-overlapping
    ``c x c`` blocks for every ``c`` in ``cells``.

    Returns a list with one ``[B, (grid // c)**2, C]`` tensor per cell, regions in row-major order
    (region ``r * (grid // c) + col``), in the tokens' dtype (accumulated in fp32).
    """
    _checks.float_tensor("tokens", tokens, ndim=3, kind=" ([B, grid*grid, C] patch tokens)")
    cells = _checks.positive_ints("cells", cells)
    for cell in cells:
        _checks.grid_cell(grid, cell)
    _checks.dim_size("tokens", tokens, 1, grid * grid, f"grid*grid tokens for grid={grid}")
    backend = backends.resolve("multigrain_pool", backend, tokens.device, tokens.dtype)
    return _multigrain_pool(tokens.contiguous(), grid, list(cells), backend)
