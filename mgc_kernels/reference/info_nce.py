"""InfoNCE with hard or sparse soft targets and a queue of extra negatives (the executable spec).

Inputs are already L2-normalised when the caller asked for it. Row ``i`` has logits
``[q_i . k_j / tau for k_j in k] + [q_i . u / tau for u in queue]`` and a target distribution
``t_i`` given sparsely by ``(index, weight)`` with ``sum(t_i)`` either 1 or 0 (a row without a
target). The loss of row ``i`` is ``CE_i = s_i * lse_i - sum_p t_ip * logit_i[index_ip]`` with
``s_i = sum(t_i)``; its gradient w.r.t. the logits is ``s_i * softmax_i - t_i``.
"""
from __future__ import annotations

import torch


def all_keys(k: torch.Tensor, queue: torch.Tensor | None) -> torch.Tensor:
    return k if queue is None else torch.cat([k, queue.to(k.dtype)])


def info_nce(q, k, queue, target_index, target_weight, temperature: float):
    """``(row_loss, lse)``, both fp32 ``[N]``."""
    logits = q.float() @ all_keys(k, queue).float().T / temperature
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, target_index)
    row_loss = target_weight.sum(1) * lse - (target_weight * picked).sum(1)
    return row_loss, lse


def info_nce_backward(grad_row_loss, q, k, queue, target_index, target_weight, lse,
                      temperature: float):
    """``(dq, dk)`` in the dtypes of ``q`` and ``k``; the queue gets no gradient."""
    keys = all_keys(k, queue).float()
    logits = q.float() @ keys.T / temperature
    g = torch.exp(logits - lse[:, None]) * (grad_row_loss * target_weight.sum(1))[:, None]
    g = g.scatter_add(1, target_index, -target_weight * grad_row_loss[:, None]) / temperature
    dq = g @ keys
    dk = g[:, : len(k)].T @ q.float()
    return dq.to(q.dtype), dk.to(k.dtype)
