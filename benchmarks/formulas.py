"""The plain-PyTorch formulas a user would write without this library.

They materialise what the library's kernels avoid (the ``N x M`` logits, and for the geometric
loss the ``N x M`` soft-target matrix) and are the ``naive`` provider as written and the
``torch_compile`` provider through ``torch.compile``. Each computes the same value as the
library op it stands beside (checked in ``tests/test_benchmarks.py``). Logits are taken to fp32
(fp64 stays fp64) before the cross-entropy, as the ops accumulate the loss in fp32 at least.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or fp64 when it is fp64 (the ops accumulate in fp32 at least)."""
    return x if x.dtype == torch.float64 else x.float()


def info_nce(q, k, targets, temperature: float, row_weights):
    """InfoNCE of ``q`` against ``k`` with hard targets, rows weighted: sum(w * CE) / sum(w)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = widen(q @ k.T) / temperature
    row_loss = F.cross_entropy(logits, targets, reduction="none")
    return (row_weights * row_loss).sum() / row_weights.sum()


def info_nce_queue(q, k, queue, targets, temperature: float):
    """InfoNCE of ``q`` against ``[k; queue]`` with hard targets into ``k``."""
    q, k, queue = (F.normalize(x, dim=1) for x in (q, k, queue))
    logits = widen(torch.cat([q @ k.T, q @ queue.T], dim=1)) / temperature
    return F.cross_entropy(logits, targets)


def mgc_weights(q_regions, k_regions, q_image, k_image):
    """``[N, M]`` MGC overlap weights ``|a & b| / (|a| + |b|)``, 0 across images."""
    ax0, ay0, ax1, ay1 = q_regions[:, None, :].unbind(-1)
    bx0, by0, bx1, by1 = k_regions[None, :, :].unbind(-1)
    width = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp_min(0)
    height = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp_min(0)
    area_a, area_b = (ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0)
    same_image = q_image[:, None] == k_image[None, :]
    return width * height / (area_a + area_b) * same_image


def geometric_info_nce(q, k, q_regions, k_regions, q_image, k_image, temperature: float):
    """Dense MGC InfoNCE: soft targets ``w / rho`` from the dense weight matrix, rows weighted
    by ``rho`` (rows without overlap have zero targets and contribute nothing)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = widen(q @ k.T) / temperature
    weights = mgc_weights(q_regions, k_regions, q_image, k_image)
    rho = weights.sum(1)
    row_loss = F.cross_entropy(logits, weights / rho.clamp_min(1e-30)[:, None], reduction="none")
    return (rho * row_loss).sum() / rho.sum()


def linear_soft_ce(
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    student_temperature: float,
    teacher_temperature: float,
):
    """DINO's loss on materialised ``[N, K]`` logits: the student's log-softmax against the
    centred, sharpened teacher softmax, mean over rows."""
    student_logits = widen(student @ student_weight.T) / student_temperature
    with torch.no_grad():
        teacher_logits = widen(teacher @ teacher_weight.T)
        target = torch.softmax((teacher_logits - center) / teacher_temperature, dim=1)
    return -(target * torch.log_softmax(student_logits, dim=1)).sum(1).mean()


def multigrain_pool(tokens, grid: int, cells):
    """Average pooling of the ``[B, grid*grid, C]`` token grid with ``F.avg_pool2d`` per cell."""
    b, _, channels = tokens.shape
    image = tokens.transpose(1, 2).reshape(b, channels, grid, grid)
    return [F.avg_pool2d(image, cell).flatten(2).transpose(1, 2) for cell in cells]
