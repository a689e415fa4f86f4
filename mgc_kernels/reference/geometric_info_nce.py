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


def geometric_targets(
    q_regions, k_regions, q_image, k_image, metric: str, rows: slice, dtype: torch.dtype
):
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


def chunk_softmax_minus_target(logits, w, lse_rows, rho_rows):
    """``(softmax - target)`` of a chunk's rows (zero for rows without any overlap)."""
    has_target = (rho_rows > 0).to(logits.dtype)[:, None]
    return (
        torch.exp(logits - lse_rows[:, None]) * has_target - w / rho_rows.clamp_min(1e-30)[:, None]
    )


def geometric_info_nce(
    q,
    k,
    q_regions,
    k_regions,
    q_image,
    k_image,
    temperature: float,
    metric: str,
    need_v: bool = True,
):
    """``(row_loss, lse, rho, v)``: ``[N]`` each in the accumulation dtype (``row_loss`` is 0
    where ``rho`` is 0) and ``v_i = sum_j (softmax_ij - t_ij) k_j`` (``[N, D]``, 0 where ``rho``
    is 0; ``[0, D]`` without ``need_v``), from which ``dq`` follows."""
    n, acc = len(q), accumulate(q.dtype)
    row_loss, lse, rho = (torch.zeros(n, device=q.device, dtype=acc) for _ in range(3))
    v = torch.zeros(n if need_v else 0, k.shape[1], device=q.device, dtype=acc)
    for rows in row_chunks(n, len(k)):
        w = geometric_targets(q_regions, k_regions, q_image, k_image, metric, rows, acc)
        logits = chunk_logits(q, k, temperature, rows)
        lse[rows] = torch.logsumexp(logits, dim=1)
        rho[rows] = w.sum(1)
        row_loss[rows] = (rho[rows] > 0).to(acc) * lse[rows] - (w * logits).sum(1) / rho[
            rows
        ].clamp_min(1e-30)
        if need_v:
            v[rows] = chunk_softmax_minus_target(logits, w, lse[rows], rho[rows]) @ k.to(acc)
    return row_loss, lse, rho, v


def geometric_info_nce_backward(
    grad_row_loss,
    q,
    k,
    q_regions,
    k_regions,
    q_image,
    k_image,
    lse,
    rho,
    temperature: float,
    metric: str,
):
    """``dk`` in ``k``'s dtype, recomputing each chunk's logits (``rho`` is the forward's)."""
    acc = accumulate(q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=acc)
    for rows in row_chunks(len(q), len(k)):
        w = geometric_targets(q_regions, k_regions, q_image, k_image, metric, rows, acc)
        logits = chunk_logits(q, k, temperature, rows)
        g = chunk_softmax_minus_target(logits, w, lse[rows], rho[rows].to(acc))
        dk += (g * grad_row_loss[rows, None] / temperature).T @ q[rows].to(acc)
    return dk.to(k.dtype)
