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


def info_nce(q, k, queue, target_index, target_weight, temperature: float):
    """``(row_loss, lse)``, both ``[N]`` in the accumulation dtype (fp32, or fp64 for fp64)."""
    acc = accumulate(q.dtype)
    logits = q.to(acc) @ all_keys(k, queue).to(acc).T / temperature
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, target_index)
    target_weight = target_weight.to(acc)
    row_loss = target_weight.sum(1) * lse - (target_weight * picked).sum(1)
    return row_loss, lse


def info_nce_backward(grad_row_loss, q, k, queue, target_index, target_weight, lse,
                      temperature: float, grad_lse=None, need_dk: bool = True):
    """``(dq, dk)`` in the dtypes of ``q`` and ``k``; the queue gets no gradient. ``grad_lse``
    (the gradient of the returned LSE, whose derivative is the softmax) may be ``None``; without
    ``need_dk``, ``dk`` is an empty ``[0, D]`` tensor."""
    acc = accumulate(q.dtype)
    keys = all_keys(k, queue).to(acc)
    logits = q.to(acc) @ keys.T / temperature
    target_weight = target_weight.to(acc)
    softmax_coef = grad_row_loss * target_weight.sum(1)
    if grad_lse is not None:
        softmax_coef = softmax_coef + grad_lse
    g = torch.exp(logits - lse[:, None]) * softmax_coef[:, None]
    g = g.scatter_add(1, target_index, -target_weight * grad_row_loss[:, None]) / temperature
    dq = g @ keys
    dk = g[:, : len(k)].T @ q.to(acc) if need_dk else k.new_empty(0, k.shape[1])
    return dq.to(q.dtype), dk.to(k.dtype)
