"""InfoNCE with hard or sparse soft targets and a queue of extra negatives (the executable spec).

Inputs are already L2-normalised when the caller asked for it. Row ``i`` has logits
``[q_i . k_j / tau for k_j in k] + [q_i . u / tau for u in queue]`` and a target distribution
``t_i`` given sparsely by ``(index, weight)`` with ``sum(t_i)`` either 1 or 0 (a row without a
target). The loss of row ``i`` is ``CE_i = s_i * lse_i - sum_p t_ip * logit_i[index_ip]`` with
``s_i = sum(t_i)``; its gradient w.r.t. the logits is ``s_i * softmax_i - t_i``.
"""

from __future__ import annotations

import torch

from .._dtypes import accumulate


def all_keys(k: torch.Tensor, queue: torch.Tensor | None) -> torch.Tensor:
    return k if queue is None else torch.cat([k, queue.to(k.dtype)])


def info_nce(q, k, queue, target_index, target_weight, temperature: float, need_v: bool = True):
    """``(row_loss, lse, v)``: ``row_loss`` and ``lse`` ``[N]`` in the accumulation dtype (fp32,
    or fp64 for fp64), and ``v_i = sum_j (a_i softmax_ij - t_ij) key_j`` over the keys and the
    queue (``[N, D]``; ``[0, D]`` without ``need_v``), with ``a_i = sum(t_i)`` or 1 for a row
    without a target. ``dq`` follows from ``v`` (``ops/info_nce.py::query_grad``)."""
    acc = accumulate(q.dtype)
    keys = all_keys(k, queue).to(acc)
    logits = q.to(acc) @ keys.T / temperature
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, target_index)
    target_weight = target_weight.to(acc)
    mass = target_weight.sum(1)
    row_loss = mass * lse - (target_weight * picked).sum(1)
    if not need_v:
        return row_loss, lse, keys.new_empty(0, keys.shape[1])
    softmax_coef = torch.where(mass > 0, mass, 1.0)
    g = torch.exp(logits - lse[:, None]) * softmax_coef[:, None]
    return row_loss, lse, g.scatter_add(1, target_index, -target_weight) @ keys


def info_nce_backward(
    grad_row_loss, q, k, queue, target_index, target_weight, lse, temperature: float, grad_lse=None
):
    """``dk`` in ``k``'s dtype (the queue gets no gradient): ``dk_j = sum_i (c'_i softmax_ij -
    g_i t_ij) q_i / tau`` with ``c'_i = g_i a_i + c_i``, ``g`` the row losses' gradient and ``c``
    the LSE's (whose derivative is the softmax; may be ``None``)."""
    acc = accumulate(q.dtype)
    logits = q.to(acc) @ k.to(acc).T / temperature
    target_weight = target_weight.to(acc)
    softmax_coef = grad_row_loss * target_weight.sum(1)
    if grad_lse is not None:
        softmax_coef = softmax_coef + grad_lse
    g = torch.exp(logits - lse[:, None]) * softmax_coef[:, None]
    g = g.scatter_add(1, target_index, -target_weight * grad_row_loss[:, None]) / temperature
    return (g.T @ q.to(acc)).to(k.dtype)
