"""Figures of a pretraining run: the loss curve and MGC's sampled region correspondences.

Figures are built with ``matplotlib.figure.Figure`` and drawn by the Agg canvas, never through
``pyplot``: no global figure registry to leak into, no display backend needed on a headless
training node, and nothing to close.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def plot_loss_curve(steps: list[int], losses: list[float], path: str | Path, *, title: str = "",
                    lrs: list[float] | None = None) -> None:
    """Write a PNG of loss against step: faint raw points under a smoothed line.

    Per-step SSL losses are noisy, so the trend is read from a centred moving average (no lag,
    unlike an EMA); the optional learning rate sits on a twin axis to show warm-up and decay
    against the loss.
    """
    if len(steps) != len(losses) or not steps:
        raise ValueError(f"steps ({len(steps)}) and losses ({len(losses)}) must be non-empty "
                         "and of equal length")
    if lrs is not None and len(lrs) != len(steps):
        raise ValueError(f"lrs ({len(lrs)}) must have one value per step ({len(steps)})")
    figure = Figure(figsize=(7, 4), layout="constrained")
    loss_axes = figure.add_subplot()
    loss_axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    loss_axes.plot(steps, _moving_average(losses), color="tab:blue", linewidth=2,
                   label="loss (smoothed)")
    loss_axes.set(xlabel="step", ylabel="loss", title=title)
    loss_axes.grid(alpha=0.3)
    if lrs is not None:
        lr_axes = loss_axes.twinx()
        lr_axes.plot(steps, lrs, color="tab:orange", linestyle="--", linewidth=1.2)
        lr_axes.set_ylabel("learning rate", color="tab:orange")
    loss_axes.legend(loc="upper right")
    _save(figure, path)


def _moving_average(values: list[float]) -> np.ndarray:
    """Centred mean over a window of ~1/25 of the run; shorter at the ends, never shifted."""
    values = np.asarray(values, dtype=float)
    half_window = len(values) // 50
    kernel = np.ones(2 * half_window + 1)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def plot_correspondences(view1: Tensor, view2: Tensor, idx1: Tensor, idx2: Tensor,
                         weight: Tensor, *, grid: int, cell: int, path: str | Path,
                         title: str = "") -> None:
    """Write a PNG of two views with their sampled region pairs, like MGC's localisation figure.

    Region ``r`` is row ``r // n``, column ``r % n`` of the ``n x n`` grid (``n = grid // cell``)
    over each view as shown. Each pair is a rectangle in each view joined by a line, one colour a
    pair; line width and opacity grow with the pair's weight, and zero-weight (padding) pairs are
    skipped, so the figure shows what the loss actually learns from.

    Args:
        view1, view2: ``[3, H, W]`` uint8, or float normalised with ImageNet mean/std.
        idx1, idx2, weight: 1-D tensors of one image's pairs.
    """
    regions_per_side = _regions_per_side(grid, cell)
    _check_pairs(idx1, idx2, weight, regions_per_side ** 2)
    figure = Figure(figsize=(8, 4.4), layout="constrained")
    panels = []
    for axes, view in zip(figure.subplots(1, 2), (view1, view2)):
        image = _displayable(view)
        axes.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
        axes.set_axis_off()
        panels.append((axes, image.shape[:2]))
    if title:
        figure.suptitle(title)
    weight = weight.detach().float().cpu()
    max_weight = float(weight.max()) if weight.numel() else 0.0
    colours = colormaps["tab10"]
    pairs = zip(idx1.tolist(), idx2.tolist(), weight.tolist())
    for pair, (region1, region2, pair_weight) in enumerate(pairs):
        if pair_weight > 0:
            _draw_pair(figure, panels, (region1, region2), regions_per_side,
                       colours(pair % colours.N), pair_weight / max_weight)
    _save(figure, path)


def _regions_per_side(grid: int, cell: int) -> int:
    if grid <= 0 or cell <= 0 or grid % cell:
        raise ValueError(f"cell must be a positive divisor of grid, got grid={grid}, cell={cell}")
    return grid // cell


def _check_pairs(idx1: Tensor, idx2: Tensor, weight: Tensor, num_regions: int) -> None:
    if not (idx1.dim() == idx2.dim() == weight.dim() == 1
            and idx1.shape == idx2.shape == weight.shape):
        raise ValueError(f"idx1 {tuple(idx1.shape)}, idx2 {tuple(idx2.shape)} and weight "
                         f"{tuple(weight.shape)} must be 1-D of equal length")
    if weight.numel() and float(weight.min()) < 0:
        raise ValueError("weight must be non-negative")
    for name, idx in (("idx1", idx1), ("idx2", idx2)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_regions):
            raise ValueError(f"{name} must lie in [0, {num_regions}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")


def _displayable(view: Tensor) -> np.ndarray:
    """``[3, H, W]`` uint8 or ImageNet-normalised float -> ``[H, W, 3]`` floats in [0, 1]."""
    if view.dim() != 3 or view.shape[0] != 3:
        raise ValueError(f"a view must be [3, H, W], got {tuple(view.shape)}")
    view = view.detach().cpu()
    if view.dtype == torch.uint8:
        pixels = view.float() / 255.0
    else:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        pixels = view.float() * std + mean
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def _draw_pair(figure: Figure, panels: list, regions: tuple[int, int], regions_per_side: int,
               colour: tuple, strength: float) -> None:
    """Outline one region in each view and join their centres; ``strength`` in (0, 1].

    ``panels`` holds ``(axes, (height, width))`` of each view's image.
    """
    centres = []
    for (axes, image_shape), region in zip(panels, regions):
        x0, y0, width, height = _region_rect(region, regions_per_side, image_shape)
        axes.add_patch(Rectangle((x0, y0), width, height, fill=False, edgecolor=colour,
                                 linewidth=1.5))
        centres.append((x0 + width / 2, y0 + height / 2))
    figure.add_artist(ConnectionPatch(
        xyA=centres[0], coordsA="data", axesA=panels[0][0], xyB=centres[1], coordsB="data",
        axesB=panels[1][0], color=colour, alpha=0.3 + 0.7 * strength,
        linewidth=0.5 + 2.5 * strength))


def _region_rect(region: int, regions_per_side: int,
                 image_shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(x0, y0, width, height)`` in pixels of row-major ``region`` of an image."""
    width, height = image_shape[1] / regions_per_side, image_shape[0] / regions_per_side
    row, col = divmod(region, regions_per_side)
    return col * width, row * height, width, height


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
