"""Dense InfoNCE whose soft targets come from region geometry (the executable spec).

``w_ij = metric(region_i, region_j)`` when query ``i`` and key ``j`` come from the same image,
else 0; ``rho_i = sum_j w_ij``; the target of row ``i`` is ``t_i = w_i / rho_i``. Rows are
processed in chunks so that only a ``chunk x M`` block of logits and targets exists at a time.
"""
from __future__ import annotations

import torch

from .._dtypes import accumulate

from .correspondence import area, box_metric

CHUNK_ELEMENTS = 1 << 24


def row_chunks(n: int, m: int):
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def geometric_targets(q_regions, k_regions, q_image, k_image, metric: str, rows: slice,
                      dtype: torch.dtype):
    """``[rows, M]`` overlap weights ``w`` of the chunk's query rows against every key."""
    geometry = accumulate(torch.promote_types(q_regions.dtype, k_regions.dtype))
    qr, kr = q_regions[rows].to(geometry), k_regions.to(geometry)
    a = [qr[:, i, None] for i in range(4)]
    b = [kr[None, :, i] for i in range(4)]
    w = box_metric(a, b, area(a), area(b), metric)
    return (w * (q_image[rows, None] == k_image[None, :])).to(dtype)


def chunk_logits(q, k, temperature: float, rows: slice) -> torch.Tensor:
    acc = accumulate(q.dtype)
    return q[rows].to(acc) @ k.to(acc).T / temperature


def chunk_softmax_minus_target(q, k, w, lse_rows, temperature, rows):
    """``(softmax - target)`` of a chunk's rows (zero for rows without any overlap)."""
    logits = chunk_logits(q, k, temperature, rows)
    rho = w.sum(1, keepdim=True)
    has_target = (rho > 0).to(rho.dtype)
    return torch.exp(logits - lse_rows[:, None]) * has_target - w / rho.clamp_min(1e-30)


def geometric_info_nce(q, k, q_regions, k_regions, q_image, k_image, temperature: float,
                       metric: str):
    """``(row_loss, lse, rho)``, ``[N]`` each in the accumulation dtype; ``row_loss`` is 0 where
    ``rho`` is 0."""
    n, acc = len(q), accumulate(q.dtype)
    row_loss, lse, rho = (torch.zeros(n, device=q.device, dtype=acc) for _ in range(3))
    for rows in row_chunks(n, len(k)):
        w = geometric_targets(q_regions, k_regions, q_image, k_image, metric, rows, acc)
        logits = chunk_logits(q, k, temperature, rows)
        lse[rows] = torch.logsumexp(logits, dim=1)
        rho[rows] = w.sum(1)
        t = w / rho[rows].clamp_min(1e-30)[:, None]
        row_loss[rows] = (rho[rows] > 0).to(acc) * lse[rows] - (t * logits).sum(1)
    return row_loss, lse, rho


def geometric_info_nce_backward(grad_row_loss, q, k, q_regions, k_regions, q_image, k_image,
                                lse, temperature: float, metric: str):
    """``(dq, dk)`` in the dtypes of ``q`` and ``k``, recomputing each chunk's logits."""
    acc = accumulate(q.dtype)
    dq = torch.empty(q.shape, device=q.device, dtype=acc)
    dk = torch.zeros(k.shape, device=k.device, dtype=acc)
    for rows in row_chunks(len(q), len(k)):
        w = geometric_targets(q_regions, k_regions, q_image, k_image, metric, rows, acc)
        g = chunk_softmax_minus_target(q, k, w, lse[rows], temperature, rows)
        g = g * grad_row_loss[rows, None] / temperature
        dq[rows] = g @ k.to(acc)
        dk += g.T @ q[rows].to(acc)
    return dq.to(q.dtype), dk.to(k.dtype)
