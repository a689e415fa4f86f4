"""Collectives over the default process group with the gradients the losses need.

``gather`` follows lightly's ``GatherLayer`` convention: its backward gives every rank the
*sum over ranks* of the gradient that flowed into its own slice of the gathered tensor. Each rank
computes a loss ``L_r`` from its local rows against the gathered batch; the gradient each rank
receives for its input is then ``d(sum_r L_r)/dx_r``, and DDP's gradient averaging turns the
parameter gradient into that of ``mean_r L_r``.

When ``torch.distributed`` is unavailable or not initialised, or the world size is 1, every
function here runs locally without a collective (and ``gather`` without a copy), so
``global_mean`` is then the plain mean ``total / count``. Nothing here syncs with the host, so the
functions are safe inside a forward or backward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "all_reduce_sums", "gather", "global_mean", "rank", "world_size"]

_TINY = torch.finfo(torch.float32).tiny  # a count below this is no count at all


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


@torch.no_grad()
def all_reduce_sums(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`all_reduce_sum` of several tensors of one dtype and device in a single collective,
    returned by name with their own shapes (detached, like its result)."""
    total = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors.values()]))
    parts = total.split([t.numel() for t in tensors.values()])
    return {name: part.view_as(t) for (name, t), part in zip(tensors.items(), parts)}


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over the rows of every rank, times ``world_size``:
    ``world_size * total / (sum over ranks of count)``, for a ``total`` and ``count`` over this
    rank's rows.

    The mean over ranks of the results (what DDP's gradient averaging optimises) is then the mean
    of one process over the whole batch, also when the ranks hold different counts. The count is
    summed without gradient (see :func:`all_reduce_sum`) and an all-zero count divides by the
    smallest normal float32 instead of zero, so no rows anywhere give 0, not NaN.
    """
    return world_size() * total / all_reduce_sum(count).clamp_min(_TINY)
