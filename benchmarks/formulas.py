"""The plain-PyTorch formulas a user would write without this library.

They materialise what the library's kernels avoid (the ``N x M`` logits, and for the geometric
loss the ``N x M`` soft-target matrix) and are the ``naive`` provider as written and the
``torch_compile`` provider through ``torch.compile``. Each computes the same value as the
library op it stands beside (checked in ``tests/test_benchmarks.py``). Logits are taken to fp32
before the cross-entropy, as the ops accumulate the loss in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_queue(q, k, queue, targets, temperature: float):
    """InfoNCE of ``q`` against ``[k; queue]`` with hard targets into ``k``."""
    q, k, queue = (F.normalize(x, dim=1) for x in (q, k, queue))
    logits = torch.cat([q @ k.T, q @ queue.T], dim=1).float() / temperature
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
    logits = (q @ k.T).float() / temperature
    weights = mgc_weights(q_regions, k_regions, q_image, k_image)
    rho = weights.sum(1)
    row_loss = F.cross_entropy(logits, weights / rho.clamp_min(1e-30)[:, None], reduction="none")
    return (rho * row_loss).sum() / rho.sum()


def multigrain_pool(tokens, grid: int, cells):
    """Average pooling of the ``[B, grid*grid, C]`` token grid with ``F.avg_pool2d`` per cell."""
    b, _, channels = tokens.shape
    image = tokens.transpose(1, 2).reshape(b, channels, grid, grid)
    return [F.avg_pool2d(image, cell).flatten(2).transpose(1, 2) for cell in cells]
