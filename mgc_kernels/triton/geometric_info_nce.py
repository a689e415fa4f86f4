"""Fused dense InfoNCE with geometric targets: the kernels of ``triton/info_nce.py`` with
``GEOMETRIC=True``, so each tile's targets ``w_ij`` are made in registers from the region boxes
and image ids, and neither the logits nor the target matrix is ever stored.

The backward op receives only ``lse`` from the forward, but every row's target is ``w_ij / rho_i``:
``_rho_kernel`` re-sums ``rho`` first (geometry only, no dot), so that the dq and dk kernels can
form ``softmax - target`` in fp32 in a single pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .info_nce import _load_boxes, _tile_weights, backward, config, forward, geometry


@triton.jit
def _rho_kernel(QBOX, QIMG, KBOX, KIMG, RHO, N, M, METRIC: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    qx0, qy0, qx1, qy1, q_img = _load_boxes(QBOX, QIMG, rows, rmask)
    rho = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, M, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        cmask = cols < M
        kx0, ky0, kx1, ky1, k_img = _load_boxes(KBOX, KIMG, cols, cmask)
        same = (q_img[:, None] == k_img[None, :]) & rmask[:, None] & cmask[None, :]
        rho += tl.sum(_tile_weights(qx0[:, None], qy0[:, None], qx1[:, None], qy1[:, None],
                                    kx0[None, :], ky0[None, :], kx1[None, :], ky1[None, :],
                                    same, METRIC), 1)
    tl.store(RHO + rows, rho, mask=rmask)


def geometric_info_nce(q, k, q_regions, k_regions, q_image, k_image, temperature: float,
                       metric: str):
    """``(row_loss, lse, rho)``, ``[N]`` fp32 each, as
    ``reference/geometric_info_nce.py::geometric_info_nce`` (geometry in fp32)."""
    boxes = geometry(q_regions, k_regions, q_image, k_image)
    return forward(q, k, None, None, boxes, temperature, metric)


def geometric_info_nce_backward(grad_row_loss, q, k, q_regions, k_regions, q_image, k_image,
                                lse, temperature: float, metric: str):
    """``(dq, dk)`` in the dtypes of ``q`` and ``k``."""
    boxes = geometry(q_regions, k_regions, q_image, k_image)
    n, m = len(q), len(k)
    rho = torch.empty(n, device=q.device, dtype=torch.float32)
    cfg = config(n, m, 4, torch.float32)
    _rho_kernel[(triton.cdiv(n, cfg["BLOCK_R"]),)](*boxes, rho, n, m, METRIC=metric,
                                                     BLOCK_R=cfg["BLOCK_R"],
                                                     BLOCK_C=cfg["BLOCK_C"])
    has_target = rho > 0
    inv_rho = torch.where(has_target, rho.reciprocal(), 0.0)
    return backward(grad_row_loss, q, k, None, None, boxes, lse, has_target.float(), inv_rho,
                    temperature, metric)
