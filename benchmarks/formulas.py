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
    a, b = q_regions[:, None, :], k_regions[None, :, :]
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
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
