"""Drawing primitives for the run's figures: the loss curve, views, numbered region outlines.

Figures are built with ``matplotlib.figure.Figure`` and drawn by the Agg canvas, never through
``pyplot``: no global figure registry to leak into, no display backend needed on a headless
training node, and nothing to close. The per-method figures that compose these primitives live
in :mod:`mgc_pretrain.figures`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLIP_COLOUR = "crimson"
# a dark halo under every coloured line and label keeps it readable on any texture
HALO = [patheffects.withStroke(linewidth=3.2, foreground="black")]

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels


def plot_loss_curve(
    steps: list[int],
    losses: list[float],
    path: str | Path,
    *,
    title: str = "",
    lrs: list[float] | None = None,
) -> None:
    """Write a PNG of loss against step: faint raw points under a smoothed line.

    Per-step SSL losses are noisy, so the trend is read from a centred moving average (no lag,
    unlike an EMA); the optional learning rate sits on a twin axis to show warm-up and decay
    against the loss.
    """
    if len(steps) != len(losses) or not steps:
        raise ValueError(
            f"steps ({len(steps)}) and losses ({len(losses)}) must be non-empty and of equal length"
        )
    if lrs is not None and len(lrs) != len(steps):
        raise ValueError(f"lrs ({len(lrs)}) must have one value per step ({len(steps)})")
    figure = Figure(figsize=(7, 4), layout="constrained")
    loss_axes = figure.add_subplot()
    loss_axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    loss_axes.plot(
        steps, _moving_average(losses), color="tab:blue", linewidth=2, label="loss (smoothed)"
    )
    loss_axes.set(xlabel="step", ylabel="loss", title=title)
    loss_axes.grid(alpha=0.3)
    if lrs is not None:
        lr_axes = loss_axes.twinx()
        lr_axes.plot(steps, lrs, color="tab:orange", linestyle="--", linewidth=1.2)
        lr_axes.set_ylabel("learning rate", color="tab:orange")
    loss_axes.legend(loc="upper right")
    save(figure, path)


def _moving_average(values: list[float]) -> np.ndarray:
    """Centred mean over a window of ~1/25 of the run; shorter at the ends, never shifted."""
    values = np.asarray(values, dtype=float)
    half_window = len(values) // 50
    kernel = np.ones(2 * half_window + 1)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def colours(count: int) -> list[tuple]:
    """``count`` colours, all distinct up to 10 (tab10), then up to 20 (tab20)."""
    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["tab20"](i % 20) for i in range(count)]


def displayable(view: Tensor) -> np.ndarray:
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


def flip_label(flipped: bool) -> str:
    """How a view's panel title states its flip: training flips views after cropping, so the
    reader must be told which view is a mirror image, or crossing pair lines look wrong."""
    return "FLIPPED left \u2194 right" if flipped else "not flipped"


def show_image(
    axes: Axes,
    image: np.ndarray | Tensor,
    title: str = "",
    *,
    flipped: bool | None = None,
    fontsize: float = 10,
) -> None:
    """An image in pixel coordinates (``(0, 0)`` the top-left corner) without ticks.

    ``flipped`` (a view's flip) adds :func:`flip_label` to the title and, when True, turns the
    title and a thick frame red, so a mirrored view stands out at a glance.
    """
    if isinstance(image, Tensor):
        image = displayable(image)
    height, width = image.shape[:2]
    axes.imshow(image, extent=(0, width, height, 0))
    axes.set(xlim=(0, width), ylim=(height, 0), xticks=[], yticks=[])
    if flipped is not None:
        title = f"{title}\n{flip_label(flipped)}" if title else flip_label(flipped)
    axes.set_title(title, fontsize=fontsize, color=FLIP_COLOUR if flipped else "black")
    if flipped:
        for spine in axes.spines.values():
            spine.set(edgecolor=FLIP_COLOUR, linewidth=3)


def nest_depths(keys: Sequence) -> list[int]:
    """How many earlier entries share each entry's key: ``[5, 5, 7, 5] -> [0, 1, 0, 2]``.

    Pairs that share a region would draw the same rectangle over each other; drawing the
    ``d``-th one inset by ``d`` steps (:func:`inset`) keeps every pair's outline visible.
    """
    seen: Counter = Counter()
    depths = []
    for key in keys:
        depths.append(seen[key])
        seen[key] += 1
    return depths


def inset(rect: Rect, depth: int, step: float) -> Rect:
    """``rect`` shrunk by ``depth * step`` on every side, never below a quarter of its size."""
    x0, y0, x1, y1 = rect
    step = min(depth * step, (x1 - x0) * 3 / 8, (y1 - y0) * 3 / 8)
    return x0 + step, y0 + step, x1 - step, y1 - step


def outline(
    axes: Axes,
    rect: Rect,
    colour,
    label: str = "",
    *,
    linestyle="-",
    linewidth: float = 2.0,
    corner: int = 0,
    shade: bool = False,
) -> None:
    """Outline ``rect`` in ``colour`` with an optional numbered tag at one of its corners
    (``corner`` 0-3: top-left, top-right, bottom-left, bottom-right), so that tags of nested
    outlines sit apart. ``shade`` fills it faintly instead of the dark halo: an area (where
    something should be) rather than a found position."""
    x0, y0, x1, y1 = rect
    axes.add_patch(
        Rectangle(
            (x0, y0),
            x1 - x0,
            y1 - y0,
            edgecolor=colour,
            linewidth=linewidth,
            linestyle=linestyle,
            fill=shade,
            facecolor=to_rgba(colour, 0.3),
            path_effects=[] if shade else HALO,
        )
    )
    if label:
        x, y = (x0, x1)[corner % 2], (y0, y1)[corner // 2 % 2]
        axes.annotate(
            label,
            (x, y),
            fontsize=7,
            fontweight="bold",
            color="white",
            ha="center",
            va="center",
            annotation_clip=False,
            bbox=dict(
                boxstyle="round,pad=0.15", facecolor=colour, edgecolor="black", linewidth=0.6
            ),
        )


def outline_all(
    axes: Axes,
    rects: Sequence[Rect],
    keys: Sequence,
    palette: Sequence,
    labels: Sequence[str],
    *,
    step: float,
    linewidths: Sequence[float] | None = None,
    corners: Sequence[int] | None = None,
) -> list[Rect]:
    """Outline every rect in its own colour, nesting those with equal ``keys`` (the same
    region) by :func:`nest_depths` and turning their tags to other corners (or to ``corners``,
    e.g. round the four for crops that overlap without being equal); returns the rects as
    drawn."""
    depths = nest_depths(keys)
    corners = depths if corners is None else corners
    drawn = []
    widths = linewidths or [2.0] * len(rects)
    for rect, depth, corner, colour, label, width in zip(
        rects, depths, corners, palette, labels, widths
    ):
        shown = inset(rect, depth, step)
        outline(axes, shown, colour, label, linewidth=width, corner=corner)
        drawn.append(shown)
    return drawn


def connect(
    figure: Figure,
    axes_a: Axes,
    xy_a: tuple[float, float],
    axes_b: Axes,
    xy_b: tuple[float, float],
    colour,
    *,
    alpha: float = 0.8,
) -> None:
    """A gently bowed line from a point of one panel to a point of another (data
    coordinates): the bow grows with the line's length, so lines that run along the same row
    (pairs of a mirrored view) part instead of drawing over each other."""
    figure.add_artist(
        ConnectionPatch(
            xyA=xy_a,
            coordsA="data",
            axesA=axes_a,
            xyB=xy_b,
            coordsB="data",
            axesB=axes_b,
            color=colour,
            alpha=alpha,
            linewidth=1.5,
            connectionstyle="arc3,rad=0.12",
        )
    )


def centre(rect: Rect) -> tuple[float, float]:
    return (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2


def save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
