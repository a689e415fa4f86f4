"""``region_boxes``: the source-pixel box of every pooled region of a view."""

from __future__ import annotations

import torch

from .. import _checks, backends
from ..reference import region_boxes as reference

backends.register("region_boxes", "torch")(reference.region_boxes)
backends.register_lazy("region_boxes", "triton", "mgc_kernels.triton.region_boxes:region_boxes")


@torch.library.custom_op("mgc_kernels::region_boxes", mutates_args=())
def _region_boxes(
    boxes: torch.Tensor, flips: torch.Tensor, per_side: int, backend: str
) -> torch.Tensor:
    return backends.call("region_boxes", backend, boxes, flips, per_side)


@_region_boxes.register_fake
def _(boxes, flips, per_side, backend):
    return boxes.new_empty(boxes.shape[0], per_side * per_side, 4)


def region_boxes(
    boxes: torch.Tensor,
    flips: torch.Tensor,
    grid: int = 14,
    cell: int = 1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Boxes ``[B, (grid // cell)**2, 4]`` (x0, y0, x1, y1, source pixels) of the regions of a view.

    Region ``r * (grid // cell) + c`` is row ``r``, column ``c`` of the pooled grid of the view as
    the network sees it: for a flipped view, column ``c`` shows crop column ``grid//cell - 1 - c``.

    Args:
        boxes: ``[B, 4]`` float crop boxes of the view in source-image pixels.
        flips: ``[B]`` bool, whether each view was flipped horizontally after cropping.
        grid: tokens per side of the backbone's patch grid.
        cell: side of the square pooling block in tokens; must divide ``grid``.
    """
    per_side = _checks.grid_cell(grid, cell)
    _checks.view("boxes", boxes, "flips", flips)
    backend = backends.resolve("region_boxes", backend, boxes.device, boxes.dtype)
    return _region_boxes(boxes, flips, per_side, backend)
