"""Fused dense InfoNCE with geometric targets: the kernels of ``triton/info_nce.py`` with
``GEOMETRIC=True``, so the band tiles' targets ``w_ij`` are made in registers from the region
boxes and image ids, and neither the logits nor the target matrix is ever stored.

Targets pair only regions of one image, so with the rows sorted by image they lie in a band of
key tiles around each query block's diagonal (about 1 % of the tiles at B = 256): the launchers
sort both sides by image (a stable argsort, the identity for the losses' own layouts) and find
each block's band by binary search, then undo the order on the way out.
"""

from __future__ import annotations

import torch

from .info_nce import forward, key_grad
from .tiles import dk_plan, forward_plan, tile_band


def by_image(image: torch.Tensor):
    """``(order, inverse)`` that sort rows by image id and put them back."""
    order = torch.argsort(image, stable=True)
    return order, torch.argsort(order)


def geometry(q_regions, k_regions, q_image, k_image):
    """Launcher form of the geometric inputs: fp32 contiguous boxes and contiguous ids."""
    return (
        q_regions.float().contiguous(),
        q_image.contiguous(),
        k_regions.float().contiguous(),
        k_image.contiguous(),
    )


def image_band(own_image, other_image, cfg: dict) -> torch.Tensor:
    """For groups of ``cfg["BAND_R"]`` rows of sorted ``own_image``, the range of sorted
    ``other_image`` with an image of the group (the only entries with geometric targets)."""
    n = len(own_image)
    starts = torch.arange(0, n, cfg["BAND_R"], device=own_image.device)
    ends = torch.clamp(starts + cfg["BAND_R"], max=n) - 1
    other = other_image.to(torch.int64)
    own = own_image.to(torch.int64)
    lo = torch.searchsorted(other, own[starts], side="left")
    hi = torch.searchsorted(other, own[ends], side="right")
    return tile_band(lo, hi, cfg["BAND_C"], len(other))


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
    """``(row_loss, lse, rho, v)``, as ``reference/geometric_info_nce.py::geometric_info_nce``
    (geometry in fp32)."""
    q_order, q_back = by_image(q_image)
    k_order, _ = by_image(k_image)
    q, k = q[q_order], k[k_order]
    boxes = geometry(q_regions[q_order], k_regions[k_order], q_image[q_order], k_image[k_order])
    band = image_band(boxes[1], boxes[3], forward_plan(q, k))
    row_loss, lse, rho, v = forward(q, k, None, None, boxes, band, temperature, metric, need_v)
    return row_loss[q_back], lse[q_back], rho[q_back], v[q_back] if need_v else v


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
    """``dk`` in ``k``'s dtype, as ``reference/geometric_info_nce.py::
    geometric_info_nce_backward``."""
    q_order, _ = by_image(q_image)
    k_order, k_back = by_image(k_image)
    q, k = q[q_order], k[k_order]
    boxes = geometry(q_regions[q_order], k_regions[k_order], q_image[q_order], k_image[k_order])
    band = image_band(boxes[3], boxes[1], dk_plan(q, k))
    g, rho = grad_row_loss.float()[q_order], rho[q_order]
    has_target = rho > 0
    coef = torch.where(has_target, g, 0.0)
    tcoef = torch.where(has_target, g / torch.where(has_target, rho, 1.0), 0.0)
    dk = key_grad(q, k, None, boxes, band, lse[q_order], coef, tcoef, temperature, metric)
    return dk[k_back]
