"""Collectives over the default process group with the gradients the losses need.

``gather`` follows lightly's ``GatherLayer`` convention: its backward gives every rank the
*sum over ranks* of the gradient that flowed into its own slice of the gathered tensor. Each rank
computes a loss ``L_r`` from its local rows against the gathered batch; the gradient each rank
receives for its input is then ``d(sum_r L_r)/dx_r``, and DDP's gradient averaging turns the
parameter gradient into that of ``mean_r L_r``.

When ``torch.distributed`` is unavailable or not initialised, or the world size is 1, every
function here is a cheap local no-op (no collective, no copy for ``gather``). Nothing here syncs
with the host, so the functions are safe inside a forward or backward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather", "all_reduce_sum", "rank", "world_size"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Gather(torch.autograd.Function):
    """all_gather + cat along dim 0; backward: all_reduce(SUM) of the full gradient, own slice.

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather`` because
    that one is deprecated (FutureWarning), refuses ``torch.compile``, and on gloo emulates its
    reduce-scatter backward with ``world_size`` scatters; one all_reduce is simpler and works on
    every backend (gloo, nccl, ...).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # A fresh contiguous copy: the incoming gradient may be shared with other graph
        # branches and must not be reduced in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, dist.get_rank() * ctx.rows, ctx.rows)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, differentiably.

    Every rank must call this with a tensor of the same shape, dtype and device (the collective
    hangs or fails otherwise). Non-contiguous inputs are fine. The backward returns to each rank
    the sum over ranks of the gradient of its own rows (see the module docstring).

    Returns ``x`` itself when not distributed or when the world size is 1.
    """
    if not _active():
        return x
    return _Gather.apply(x)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, as a new detached tensor; ``x`` is never modified.

    No gradient flows through the result (also when not distributed, where it is a detached copy
    of ``x``), so a loss normalised by it has the same gradient on one rank or many.
    """
    out = x.detach().clone(memory_format=torch.contiguous_format)
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
