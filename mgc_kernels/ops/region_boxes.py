"""``region_boxes``: the source-pixel box of every pooled region of a view."""

from __future__ import annotations

import torch

from .. import _checks, backends
from ..reference import region_boxes as reference

backends.register("region_boxes", "torch")(reference.region_boxes)
backends.register_lazy("region_boxes", "triton", "mgc_kernels.triton.region_boxes:region_boxes")


@torch.library.custom_op("mgc_kernels::region_boxes", mutates_args=())
def _region_boxes(boxes: torch.Tensor, flips: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    return backends.call("region_boxes", backend, boxes, flips, n)


@_region_boxes.register_fake
def _(boxes, flips, n, backend):
    return boxes.new_empty(boxes.shape[0], n * n, 4)


def check_view(
    boxes,
    flips,
    boxes_name: str = "boxes",
    flips_name: str = "flips",
    batch: int | None = None,
    device: torch.device | None = None,
) -> None:
    """One view's ``[B, 4]`` boxes and ``[B]`` flips, on one device (``device`` if given)."""
    _checks.boxes_shape(boxes_name, boxes, batch)
    _checks.flips(flips_name, flips, boxes.shape[0])
    device = boxes.device if device is None else device
    _checks.on_device(boxes_name, boxes, device)
    _checks.on_device(flips_name, flips, device)
    _checks.boxes_values(boxes_name, boxes)


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
    n = _checks.grid_cell(grid, cell)
    check_view(boxes, flips)
    backend = backends.resolve("region_boxes", backend, boxes.device, boxes.dtype)
    return _region_boxes(boxes, flips, n, backend)
