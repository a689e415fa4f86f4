"""``correspondence``: overlap weights between every region of one view and of the other."""

from __future__ import annotations

import torch

from .. import _checks, backends
from ..options import METRICS
from ..reference import correspondence as reference

backends.register("correspondence", "torch")(reference.correspondence)
backends.register_lazy(
    "correspondence", "triton", "mgc_kernels.triton.correspondence:correspondence"
)
backends.register_lazy("correspondence", "native", "mgc_kernels.native:correspondence")


@torch.library.custom_op("mgc_kernels::correspondence", mutates_args=())
def _correspondence(
    boxes1: torch.Tensor,
    flips1: torch.Tensor,
    boxes2: torch.Tensor,
    flips2: torch.Tensor,
    per_side: int,
    metric: str,
    backend: str,
) -> torch.Tensor:
    return backends.call(
        "correspondence", backend, boxes1, flips1, boxes2, flips2, per_side, metric
    )


@_correspondence.register_fake
def _(boxes1, flips1, boxes2, flips2, per_side, metric, backend):
    regions = per_side * per_side
    return boxes1.new_empty(boxes1.shape[0], regions, regions)


def correspondence(
    boxes1: torch.Tensor,
    flips1: torch.Tensor,
    boxes2: torch.Tensor,
    flips2: torch.Tensor,
    grid: int = 14,
    cell: int = 1,
    metric: str = "mgc",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``[B, R, R]`` weights between region ``i`` of view 1 and region ``j`` of view 2.

    ``R = (grid // cell)**2`` regions per view, ordered as in :func:`region_boxes` (flip-aware).
    ``metric`` is ``"mgc"`` (``|a & b| / (|a| + |b|)``, MGC's weight, in [0, 0.5]), ``"iou"`` or
    ``"ioa"`` (``|a & b| / |a|``, ``a`` the view-1 region); areas are in source pixels.
    """
    per_side = _checks.grid_cell(grid, cell)
    _checks.choice("metric", metric, METRICS)
    _checks.views(boxes1, flips1, boxes2, flips2)
    backend = backends.resolve("correspondence", backend, boxes1.device, boxes1.dtype)
    return _correspondence(boxes1, flips1, boxes2, flips2, per_side, metric, backend)
