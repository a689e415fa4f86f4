"""DenseCL: Dense Contrastive Learning (Wang, Zhang, Shen, Kong, Li, CVPR 2021, "Dense Contrastive
Learning for Self-Supervised Visual Pre-Training", arXiv:2011.09157)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, distributed
from .._dtypes import accumulate
from ..ops.info_nce import info_nce


def _tokens(name: str, x, kind: str) -> torch.Tensor:
    """``[B, S, C]`` tokens as given, or a ``[B, C, H, W]`` map flattened row-major to
    ``[B, H*W, C]`` (position ``h * W + w``)."""
    _checks.float_tensor(name, x)
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() != 3:
        raise ValueError(
            f"{name} must be [B, S, C] {kind} or a [B, C, H, W] map, got {_checks.describe(x)}"
        )
    return x


def _same_size(
    name: str,
    x: torch.Tensor,
    dim: int,
    expected: int,
    what: str,
    shown: torch.Tensor | None = None,
) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} must have {expected} {what}, got "
            f"{_checks.describe(x if shown is None else shown)}"
        )


@torch.no_grad()
def dense_argmax_match(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """DenseCL's correspondence: for every position ``i`` of view 1, the most similar position of
    view 2, ``j*(i) = argmax_j cos(f1_i, f2_j)``.

    Args:
        f1: backbone features of view 1, ``[B, S1, C]`` tokens or a ``[B, C, H1, W1]`` map
            (flattened row-major: position ``i = h * W1 + w``).
        f2: backbone features of view 2, ``[B, S2, C]`` or ``[B, C, H2, W2]`` likewise.

    Returns:
        ``LongTensor [B, S1]`` of view-2 positions in ``[0, S2)``. Computed without gradient, on
        L2-normalised features in fp32 (fp64 for fp64 inputs), as one batched matmul; a tie goes
        to the lowest index (``torch.argmax``).
    """
    t1 = _tokens("f1", f1, "backbone tokens")
    t2 = _tokens("f2", f2, "backbone tokens")
    _checks.same_device(f1=f1, f2=f2)
    _same_size("f2", t2, 0, len(t1), f"images (the batch size of f1, {len(t1)})", f2)
    _same_size("f2", t2, 2, t1.shape[2], f"channels (the channels C of f1, {t1.shape[2]})", f2)
    acc = torch.promote_types(accumulate(t1.dtype), accumulate(t2.dtype))
    n1, n2 = F.normalize(t1.to(acc), dim=-1), F.normalize(t2.to(acc), dim=-1)
    return torch.bmm(n1, n2.transpose(1, 2)).argmax(dim=2)


class DenseCLLoss(nn.Module):
    """DenseCL: MoCo-v2 global contrast plus dense contrast between matched positions.

    With ``l2n`` L2 normalisation, ``tau`` the temperature, ``Q_g`` / ``Q_d`` the global and dense
    queues (``[K, dim]``, unit rows) and ``CE_0`` the cross-entropy against target 0::

        L_global = mean_b  CE_0([l2n(q_b) . l2n(k_b),  l2n(q_b) . Q_g^T] / tau)
        j*(b, i) = argmax_j cos(f1[b, i], f2[b, j])          (backbone features; no gradient)
        L_dense  = mean_{b, i} CE_0([l2n(dq_bi) . l2n(dk_{b, j*(b, i)}),  l2n(dq_bi) . Q_d^T] / tau)
        L = (1 - lambda) L_global + lambda L_dense

    ``q`` / ``dq`` come from the online global / dense heads of view 1, ``k`` / ``dk`` from the
    momentum heads of view 2; keys get no gradient (they are detached here) and the queues only
    supply negatives. Both terms run through :func:`mgc_kernels.info_nce` with
    ``targets="paired"``, so the ``(B*S) x K`` dense logits are never stored. The loss is
    asymmetric (view 1 queries, view 2 keys), as in the paper.

    After the loss is computed (as MoCo does), when ``self.training`` (or ``update=True``), the
    queues are updated as ring buffers: the global queue receives ``l2n(k_b)``; the dense queue
    receives one key per image, ``l2n(mean_j dk_bj)``, the mean over positions of the *raw*
    dense-head keys normalised after pooling (the released code average-pools the dense head's
    output and then normalises it). Each step writes its keys at ``ptr, ptr + 1, ...`` modulo
    ``K`` (wrapping around; when a step has more than ``K`` keys only the last ``K`` survive, as if
    written one by one) and advances ``ptr`` by the number of keys. Queues and pointers are
    buffers, saved in the ``state_dict``, so training resumes exactly; the queues start as
    L2-normalised Gaussian noise like MoCo's (seed with ``torch.manual_seed`` for identical queues
    on every rank).

    With ``gather_distributed=True`` the keys to enqueue are all-gathered (in rank order) so every
    rank enqueues the same keys and the queues stay identical. Each rank's loss is the mean over
    its own rows; all ranks hold the same number of rows (the all-gather requires it), so that
    mean is ``world_size x`` its share of the global mean, and the mean over ranks (what DDP's
    gradient averaging optimises) is the loss of one process over the whole batch.

    Usage (ResNet-50: backbone maps ``[B, 2048, 7, 7]``)::

        crit = mk.DenseCLLoss()                        # dim 128, K 65536, tau 0.2, lambda 0.5
        f1 = backbone(x1)
        q, dq = global_head(f1), dense_head(f1)        # [B, 128], [B, 128, 7, 7]
        with torch.no_grad():
            f2 = momentum_backbone(x2)
            k, dk = momentum_global_head(f2), momentum_dense_head(f2)
        loss = crit(q, k, dq, dk, f1, f2)              # then enqueues k and the pooled dk

    Args:
        dim: width of the head outputs and of the queues (128).
        queue_size: ``K``, keys per queue (65536).
        temperature: ``tau`` (0.2).
        loss_lambda: ``lambda``, the weight of the dense term in ``[0, 1]`` (0.5).
        gather_distributed: all-gather keys over ``torch.distributed`` ranks before enqueueing.
        backend: op backend for :func:`mgc_kernels.info_nce` (``None`` = the library default).
    """

    global_queue: torch.Tensor
    dense_queue: torch.Tensor
    global_queue_ptr: torch.Tensor
    dense_queue_ptr: torch.Tensor

    def __init__(
        self,
        dim: int = 128,
        *,
        queue_size: int = 65536,
        temperature: float = 0.2,
        loss_lambda: float = 0.5,
        gather_distributed: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.dim = _checks.integer("dim", dim, 1)
        self.queue_size = _checks.integer("queue_size", queue_size, 1)
        self.temperature = _checks.positive("temperature", temperature)
        self.loss_lambda = _checks.real("loss_lambda", loss_lambda, 0, 1)
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend
        for name in ("global_queue", "dense_queue"):
            self.register_buffer(name, F.normalize(torch.randn(self.queue_size, self.dim), dim=1))
            self.register_buffer(f"{name}_ptr", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, queue_size={self.queue_size}, temperature={self.temperature}, "
            f"loss_lambda={self.loss_lambda}, gather_distributed={self.gather_distributed}"
        )

    def forward(
        self,
        q_global: torch.Tensor,
        k_global: torch.Tensor,
        q_dense: torch.Tensor,
        k_dense: torch.Tensor,
        f1: torch.Tensor,
        f2: torch.Tensor,
        *,
        update: bool | None = None,
        return_terms: bool = False,
    ):
        """The DenseCL loss (fp32 scalar; fp64 for fp64 inputs).

        Args:
            q_global: online global-head output of view 1, ``[B, dim]``.
            k_global: momentum global-head output of view 2, ``[B, dim]`` (detached here).
            q_dense: online dense-head output of view 1, ``[B, S1, dim]`` or ``[B, dim, H1, W1]``.
            k_dense: momentum dense-head output of view 2, ``[B, S2, dim]`` or
                ``[B, dim, H2, W2]`` (detached here).
            f1, f2: backbone features of view 1 / view 2 that the dense heads read,
                ``[B, S1, C]`` / ``[B, S2, C]`` or ``[B, C, H, W]`` maps; they only choose the
                positives (:func:`dense_argmax_match`). Maps are flattened row-major everywhere.
            update: enqueue this step's keys; ``None`` (default) enqueues in training mode only.
            return_terms: also return the detached ``(L_global, L_dense)`` for logging.
        """
        dq, dk, t1, t2 = self._check_inputs(q_global, k_global, q_dense, k_dense, f1, f2)
        k_global, dk = k_global.detach(), dk.detach()
        match = dense_argmax_match(t1, t2)  # [B, S1]
        dk_matched = dk.gather(1, match[..., None].expand(-1, -1, self.dim))  # [B, S1, dim]
        loss_global = info_nce(
            q_global,
            k_global.to(q_global.dtype),
            "paired",
            self.temperature,
            queue=self.global_queue.to(q_global.dtype),
            backend=self.backend,
        )
        loss_dense = info_nce(
            dq.reshape(-1, self.dim),
            dk_matched.reshape(-1, self.dim).to(dq.dtype),
            "paired",
            self.temperature,
            queue=self.dense_queue.to(dq.dtype),
            backend=self.backend,
        )
        loss = (1 - self.loss_lambda) * loss_global + self.loss_lambda * loss_dense

        if self.training if update is None else update:
            self.enqueue(k_global, dk.to(accumulate(dk.dtype)).mean(1))
        if return_terms:
            return loss, loss_global.detach(), loss_dense.detach()
        return loss

    def _check_inputs(self, q_global, k_global, q_dense, k_dense, f1, f2):
        """Checks the shapes and devices of :meth:`forward`'s inputs; returns ``q_dense``,
        ``k_dense``, ``f1`` and ``f2`` as ``[B, S, C]`` tokens."""
        _checks.float_tensor("q_global", q_global, ndim=2, kind=" ([B, dim] global queries)")
        batch = len(q_global)
        _same_size("q_global", q_global, 1, self.dim, f"features in dimension 1 (dim={self.dim})")
        _checks.float_tensor("k_global", k_global, ndim=2, kind=" ([B, dim] global keys)")
        if tuple(k_global.shape) != tuple(q_global.shape):
            raise ValueError(
                f"k_global must be [B, dim] = {tuple(q_global.shape)} like q_global, "
                f"got {_checks.describe(k_global)}"
            )
        dq = _tokens("q_dense", q_dense, "dense queries")
        dk = _tokens("k_dense", k_dense, "dense keys")
        t1 = _tokens("f1", f1, "backbone tokens")
        t2 = _tokens("f2", f2, "backbone tokens")
        for name, x, shown in (
            ("q_dense", dq, q_dense),
            ("k_dense", dk, k_dense),
            ("f1", t1, f1),
            ("f2", t2, f2),
        ):
            _same_size(name, x, 0, batch, f"images (the batch size of q_global, {batch})", shown)
        for name, x, shown in (("q_dense", dq, q_dense), ("k_dense", dk, k_dense)):
            _same_size(name, x, 2, self.dim, f"features per position (dim={self.dim})", shown)
        for name, x, shown, source, tokens in (
            ("q_dense", dq, q_dense, "f1", t1),
            ("k_dense", dk, k_dense, "f2", t2),
        ):
            positions = tokens.shape[1]
            what = f"positions (the positions of {source}, {positions})"
            _same_size(name, x, 1, positions, what, shown)
        _checks.same_device(
            q_global=q_global, k_global=k_global, q_dense=q_dense, k_dense=k_dense, f1=f1, f2=f2
        )
        return dq, dk, t1, t2

    @torch.no_grad()
    def enqueue(self, k_global: torch.Tensor, k_dense_pooled: torch.Tensor) -> None:
        """Write ``l2n(k_global)`` ``[B, dim]`` into the global queue and ``l2n(k_dense_pooled)``
        ``[B, dim]`` (per-image means of the raw dense keys) into the dense queue, after
        all-gathering both when ``gather_distributed``. ``forward`` calls this itself."""
        for name, keys in (("global_queue", k_global), ("dense_queue", k_dense_pooled)):
            keys = F.normalize(keys.detach().to(accumulate(keys.dtype)), dim=1)
            if self.gather_distributed:
                keys = distributed.gather(keys)
            self._write(name, keys)

    def _write(self, name: str, keys: torch.Tensor) -> None:
        queue, ptr = getattr(self, name), getattr(self, f"{name}_ptr")
        size, count = len(queue), len(keys)
        skip = max(count - size, 0)  # written one by one, these would be overwritten in this step
        index = (ptr + skip + torch.arange(count - skip, device=queue.device)) % size
        queue.index_copy_(0, index, keys[skip:].to(queue.dtype))
        ptr.copy_((ptr + count) % size)


__all__ = ["DenseCLLoss", "dense_argmax_match"]
