"""``correspondences.png``: what each method contrasts, drawn from its own view of one batch.

The five methods use the two views differently (MGC: sampled region pairs; DenseCL: argmax
feature matches; SMoG: group assignments; ADCLR: small query crops; MCL: montages), so one
shared picture would explain none of them. :func:`draw_method_figure` picks the method's figure;
each states the method, which views are flipped and what is drawn, and computes what it shows
with the method's own ops (``mk.sample_pairs``, ``mk.dense_argmax_match``, ``query_boxes`` /
``to_view``, ``mk.transforms.montage``, the SMoG groups' ``assign``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

import mgc_kernels as mk

from .methods import ADCLR, MCL, MGC, DenseCL, Method, SMoG, query_boxes, to_view
from .models import features, patch_tokens
from .plots import (
    HALO,
    Rect,
    centre,
    colours,
    connect,
    displayable,
    inset,
    outline,
    outline_all,
    save,
    show_image,
)

GEOMETRY = ("box1", "flip1", "box2", "flip2")
MGC_CELL = 2  # the paper's localisation figure: 7 x 7 regions, pairs easy to see
DENSECL_QUERIES = 3  # per side: a 3 x 3 spread of query tokens over the crops' overlap
SHOWN_IMAGES = 8  # MCL / SMoG thumbnails per row
SEED = 0  # ADCLR's query crops and MCL's montage draws, so figures are repeatable


def draw_method_figure(
    method: Method, batch: dict, path: str | Path, *, title_prefix: str = ""
) -> None:
    """Write a PNG of what ``method`` contrasts on the first image(s) of ``batch``.

    ``batch`` is a collated training batch (``view1``, ``view2`` ``[B, 3, S, S]`` ImageNet-
    normalised, ``box1``/``box2`` ``[B, 4]``, ``flip1``/``flip2`` ``[B]``) on any device. The
    model runs in eval mode without gradient and is put back in its previous mode; no loss
    state (queues, groups, banks) changes and the global RNG is left as it was.
    """
    batch = {key: value.detach().cpu() for key, value in batch.items() if torch.is_tensor(value)}
    draw = next((draw for kind, draw in FIGURES.items() if isinstance(method, kind)), None)
    if draw is None:
        raise TypeError(
            f"no figure for {type(method).__name__}; known: "
            f"{', '.join(kind.__name__ for kind in FIGURES)}"
        )
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            figure = draw(method, batch)
    finally:
        method.train(was_training)
    if title_prefix:
        figure.suptitle(f"{title_prefix}{figure.get_suptitle()}", fontsize=12)
    save(figure, path)


# --- geometry -------------------------------------------------------------------------------


def view_rects(regions: Tensor, batch: dict, view: int, index: int = 0) -> Tensor:
    """Source-pixel regions ``[N, 4]`` of image ``index`` -> pixel rects ``[N, 4]`` of view
    ``view`` (1 or 2) as shown, through ``methods.to_view`` (crop, resize, flip)."""
    size = batch[f"view{view}"].shape[-1]
    unit = to_view(
        regions[None].float(),
        batch[f"box{view}"][index : index + 1],
        batch[f"flip{view}"][index : index + 1],
    )[0]
    return (unit + 1) / 2 * size


def grid_rect(region: int, per_side: int, size: int) -> Rect:
    """Pixel rect of row-major ``region`` of a ``per_side x per_side`` grid over a view."""
    row, col = divmod(int(region), per_side)
    side = size / per_side
    return col * side, row * side, (col + 1) * side, (row + 1) * side


def overlap(batch: dict, index: int = 0) -> Tensor:
    """``[4]`` source-pixel box that both crops of image ``index`` show."""
    box1, box2 = batch["box1"][index], batch["box2"][index]
    return torch.cat([torch.maximum(box1[:2], box2[:2]), torch.minimum(box1[2:], box2[2:])])


def flips(batch: dict, index: int = 0) -> tuple[bool, bool]:
    return bool(batch["flip1"][index]), bool(batch["flip2"][index])


def flip_summary(batch: dict, index: int = 0) -> str:
    """The suptitle's account of the flips, e.g. ``"view 2 flipped"``."""
    flipped = [f"view {v}" for v, f in zip((1, 2), flips(batch, index)) if f]
    return (" and ".join(flipped) + " flipped") if flipped else "no view flipped"


def paste_back(batch: dict, index: int = 0) -> tuple[np.ndarray, Tensor]:
    """Both views of image ``index`` un-flipped and resized back into their crop boxes on one
    canvas (the smaller crop on top, so both show): the crop layout in source pixels, where
    nothing is mirrored. Returns the ``[H, W, 3]`` canvas and its top-left corner in source
    pixels."""
    boxes = [batch[f"box{v}"][index] for v in (1, 2)]
    lo = torch.minimum(boxes[0][:2], boxes[1][:2]).floor()
    hi = torch.maximum(boxes[0][2:], boxes[1][2:]).ceil()
    width, height = (hi - lo).int().tolist()
    canvas = np.full((height, width, 3), 0.9)
    areas = [float((box[2:] - box[:2]).prod()) for box in boxes]
    for view in sorted((1, 2), key=lambda v: -areas[v - 1]):
        image = torch.from_numpy(displayable(batch[f"view{view}"][index])).permute(2, 0, 1)
        if batch[f"flip{view}"][index]:
            image = image.flip(-1)
        x0, y0, x1, y1 = (boxes[view - 1] - lo.repeat(2)).round().int().tolist()
        resized = F.interpolate(
            image[None],
            size=(y1 - y0, x1 - x0),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        canvas[y0:y1, x0:x1] = resized.permute(1, 2, 0).clamp(0, 1).numpy()
    return canvas, lo


# --- shared layout --------------------------------------------------------------------------


def two_views(
    batch: dict, title: str, caption: str, *, index: int = 0
) -> tuple[Figure, list[Axes]]:
    """Figure with view 1, view 2 (flips marked) and the crop layout panel (which shows why
    a mirrored view's regions sit on the other side)."""
    figure = Figure(figsize=(12.6, 5.4), layout="constrained")
    axes = list(figure.subplots(1, 3, width_ratios=[1, 1, 0.9]))
    for view, panel, flipped in zip((1, 2), axes, flips(batch, index)):
        show_image(panel, batch[f"view{view}"][index], f"view {view}", flipped=flipped)
    draw_layout(axes[2], batch, index)
    figure.suptitle(f"{title} — {flip_summary(batch, index)}", fontsize=12)
    figure.supxlabel(caption, fontsize=9, wrap=True)
    return figure, axes


def draw_layout(axes: Axes, batch: dict, index: int = 0) -> None:
    """The crop layout panel: both crops pasted back un-flipped, boxes outlined and named."""
    canvas, lo = paste_back(batch, index)
    x, y = lo.tolist()
    axes.imshow(canvas, extent=(x, x + canvas.shape[1], y + canvas.shape[0], y))
    axes.set(xticks=[], yticks=[])
    axes.set_title(
        "where the crops lie in the source image\n(pasted back un-mirrored)", fontsize=10
    )
    for view, style in ((1, "-"), (2, "--")):
        x0, y0, x1, y1 = batch[f"box{view}"][index].tolist()
        outline(axes, (x0, y0, x1, y1), "white", linestyle=style, linewidth=1.8)
        flipped = bool(batch[f"flip{view}"][index])
        axes.annotate(
            f"view {view}" + (" (then mirrored)" if flipped else ""),
            (x0 + 2, (y0 + 2) if view == 1 else (y1 - 2)),
            fontsize=8,
            color="white",
            va="top" if view == 1 else "bottom",
            path_effects=HALO,
        )


def draw_pairs(
    figure: Figure,
    axes: list[Axes],
    rects1: list[Rect],
    rects2: list[Rect],
    keys1: list,
    keys2: list,
    *,
    step: float,
    linewidths: list[float] | None = None,
    corners: list[int] | None = None,
) -> None:
    """Pair ``i`` outlined in both views in its own colour, tagged ``i + 1``, joined by a
    line; pairs sharing a region are nested (:func:`plots.outline_all`)."""
    palette = colours(len(rects1))
    labels = [str(i + 1) for i in range(len(rects1))]
    drawn1, drawn2 = (
        outline_all(
            panel, rects, keys, palette, labels, step=step, linewidths=linewidths, corners=corners
        )
        for panel, rects, keys in ((axes[0], rects1, keys1), (axes[1], rects2, keys2))
    )
    for rect1, rect2, colour in zip(drawn1, drawn2, palette):
        connect(figure, axes[0], centre(rect1), axes[1], centre(rect2), colour, alpha=0.6)


# --- MGC ------------------------------------------------------------------------------------


def mgc_pairs(method: MGC, batch: dict, index: int = 0) -> tuple[int, Tensor, Tensor, Tensor]:
    """``(cell, idx1, idx2, weight)``: the pairs MGC's loss samples for image ``index`` at
    :data:`MGC_CELL` (else its first cell), padding dropped."""
    crit = method.criterion
    level = crit.cells.index(MGC_CELL) if MGC_CELL in crit.cells else 0
    geometry = [batch[key][index : index + 1] for key in GEOMETRY]
    pairs = crit.sample_pairs(*geometry, backend="torch")[level]
    keep = pairs.weight[0] > 0
    return crit.cells[level], pairs.idx1[0][keep], pairs.idx2[0][keep], pairs.weight[0][keep]


def mgc_figure(method: MGC, batch: dict) -> Figure:
    grid, size = method.arch.grid, batch["view1"].shape[-1]
    cell, idx1, idx2, weight = mgc_pairs(method, batch)
    per_side = grid // cell
    figure, axes = two_views(
        batch,
        f"MGC: the {len(idx1)} region pairs sampled at cell {cell}",
        f"The loss contrasts each numbered region of view 1 with the same-numbered region of "
        f"view 2 (the {per_side} x {per_side} grid of {cell} x {cell}-token regions; thicker "
        "= larger overlap). A region paired more than once is outlined again, nested inside, "
        "with its tag at another corner. In a mirrored view the content's left and right are "
        "swapped, so lines between a flipped and an unflipped view cross.",
    )
    widths = (1.2 + 1.8 * weight / weight.max()).tolist() if len(weight) else None
    draw_pairs(
        figure,
        axes,
        [grid_rect(r, per_side, size) for r in idx1],
        [grid_rect(r, per_side, size) for r in idx2],
        idx1.tolist(),
        idx2.tolist(),
        step=size / per_side / 7,
        linewidths=widths,
    )
    return figure


# --- DenseCL --------------------------------------------------------------------------------


def densecl_matches(method: DenseCL, batch: dict, index: int = 0) -> Tensor:
    """``[grid**2]``: for every token of view 1 the view-2 token DenseCL's loss pairs it with,
    the cosine argmax of the online (view 1) against the momentum (view 2) backbone tokens."""
    device = next(method.parameters()).device
    f1 = patch_tokens(method.backbone, batch["view1"][index : index + 1].to(device))
    f2 = patch_tokens(method.momentum_backbone, batch["view2"][index : index + 1].to(device))
    return mk.dense_argmax_match(f1, f2)[0].cpu()


def spread_queries(batch: dict, grid: int, index: int = 0) -> list[int]:
    """A ``3 x 3`` spread of view-1 tokens over the part of view 1 that view 2 also shows, so
    every query's content has a true position in view 2 to judge its match by."""
    size = batch["view1"].shape[-1]
    x0, y0, x1, y1 = view_rects(overlap(batch, index)[None], batch, 1, index)[0].tolist()
    fractions = (np.arange(DENSECL_QUERIES) + 0.5) / DENSECL_QUERIES
    tokens = [
        int(min((y0 + fy * (y1 - y0)) * grid // size, grid - 1)) * grid
        + int(min((x0 + fx * (x1 - x0)) * grid // size, grid - 1))
        for fy in fractions
        for fx in fractions
    ]
    return list(dict.fromkeys(tokens))


def densecl_figure(method: DenseCL, batch: dict) -> Figure:
    grid, size = method.arch.grid, batch["view1"].shape[-1]
    queries = spread_queries(batch, grid)
    matches = densecl_matches(method, batch)[queries].tolist()
    tokens1 = mk.region_boxes(batch["box1"][:1], batch["flip1"][:1], grid, 1)[0, queries]
    truths = view_rects(tokens1, batch, 2).tolist()
    found = [grid_rect(m, grid, size) for m in matches]
    hits = sum(
        t[0] <= centre(f)[0] <= t[2] and t[1] <= centre(f)[1] <= t[3] for t, f in zip(truths, found)
    )
    figure, axes = two_views(
        batch,
        f"DenseCL: argmax feature matches of {len(queries)} view-1 tokens "
        f"({hits}/{len(queries)} on target)",
        "Outlined squares: a query token of view 1 (online backbone) and, same number, the "
        "view-2 token whose momentum-backbone feature is most cosine-similar, which the dense "
        "loss pulls it towards. Shaded, dashed: where the query's content really is in view 2 "
        "(from the crop boxes and flips); a match is on target when it lands inside. Queries "
        "are spread over the part of view 1 that view 2 also shows.",
    )
    draw_pairs(
        figure,
        axes,
        [grid_rect(q, grid, size) for q in queries],
        found,
        queries,
        matches,
        step=size / grid / 6,
    )
    for number, (truth, colour) in enumerate(zip(truths, colours(len(queries))), 1):
        outline(
            axes[1], truth, colour, str(number), linestyle="--", linewidth=1.2, corner=3, shade=True
        )
    return figure


# --- ADCLR ----------------------------------------------------------------------------------


def adclr_queries(method: ADCLR, batch: dict, index: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(regions, rects1, rects2)`` ``[Q, 4]`` each: ADCLR's query crops of image ``index``
    (``methods.query_boxes`` under :data:`SEED`, source pixels) and their pixel rects in view
    1 and view 2 (``methods.to_view``), as the method crops them for its query tokens."""
    torch.manual_seed(SEED)
    regions = query_boxes(
        batch["box1"][index : index + 1], batch["box2"][index : index + 1], method.num_queries
    )[0]
    return regions, view_rects(regions, batch, 1, index), view_rects(regions, batch, 2, index)


def adclr_figure(method: ADCLR, batch: dict) -> Figure:
    regions, rects1, rects2 = adclr_queries(method, batch)
    count = len(regions)
    figure, axes = two_views(
        batch,
        f"ADCLR: {count} query crops",
        "Each numbered square is one query crop, drawn at random inside the part of the image "
        "that both views show; it is cut from both views, resampled to one patch and fed to "
        "the ViT as an extra query token, and the two views' query tokens are trained to agree "
        "(DINO loss). Right: the same crops in the source image, where nothing is mirrored.",
    )
    keys = list(range(count))
    draw_pairs(
        figure,
        axes,
        rects1.tolist(),
        rects2.tolist(),
        keys,
        keys,
        step=0,
        corners=[i % 4 for i in keys],
    )
    outline_all(
        axes[2],
        regions.tolist(),
        keys,
        colours(count),
        [str(i + 1) for i in keys],
        step=0,
        corners=[i % 4 for i in keys],
    )
    return figure


# --- MCL ------------------------------------------------------------------------------------


def mcl_montages(method: MCL, batch: dict) -> list[tuple[int, Tensor, Tensor]]:
    """``(ratio, montage [3, S, S], sources [ratio**2])`` of the first montage of view 1 at
    every ratio above 1, made by MCL's own ``montages`` (from the batch's fresh views of each
    level when it has them, as in training; ratio 1 is the plain view)."""
    generator = torch.Generator().manual_seed(SEED)
    images, sources = method.montages(batch, 1, generator)
    per_level = images.split([len(s) for s in sources])
    return [
        (ratio, tiled[0], src[0])
        for ratio, tiled, src in zip(method.criterion.ratios, per_level, sources)
        if ratio > 1
    ]


def mcl_figure(method: MCL, batch: dict) -> Figure:
    montages = mcl_montages(method, batch)
    shown = list(dict.fromkeys(i for _, _, s in montages for i in s.tolist()))[:SHOWN_IMAGES]
    palette = dict(zip(shown, colours(len(shown))))
    figure = Figure(figsize=(4.2 * max(len(montages), 2), 7.2), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[2.4, 1])
    for panel, (ratio, tiled, sources) in zip(
        np.atleast_1d(top.subplots(1, len(montages))), montages
    ):
        show_image(panel, tiled, f"view-1 montage, ratio {ratio} ({ratio} x {ratio} images)")
        draw_tiles(panel, sources.tolist(), ratio, tiled.shape[-1], palette)
    for panel, image in zip(bottom.subplots(1, len(shown)), shown):
        mirrored = "\n(mirrored)" if batch["flip2"][image] else ""
        show_image(panel, batch["view2"][image], f"image {image}, view 2{mirrored}", fontsize=8)
        for spine in panel.spines.values():
            spine.set(edgecolor=palette[image], linewidth=4)
    figure.suptitle(
        "MCL: montages of the batch's images, tiles numbered by source image", fontsize=12
    )
    figure.supxlabel(
        "Each tile is a fresh augmentation of an image (a new crop, flip and colour draw per "
        "level, kept at every ratio-th pixel, as in training); its pooled tokens are trained "
        "to match the momentum embedding of view 2 of the image with the same number (bottom "
        "row, frame colour = outline colour), against every other image's as negatives. A level "
        "holds about B / ratio^2 montages, each image about once. Ratio 1 is the plain view; "
        "montages of view 2 pair with view 1 likewise. Flips do not matter to a whole-image "
        "embedding.",
        fontsize=9,
        wrap=True,
    )
    return figure


def draw_tiles(axes: Axes, sources: list[int], ratio: int, size: int, palette: dict) -> None:
    """Tag every tile with its source image; outline the tiles of the images shown below."""
    for slot, image in enumerate(sources):
        rect = inset(grid_rect(slot, ratio, size), 1, size / ratio / 25)  # apart at shared edges
        if image in palette:
            outline(axes, rect, palette[image], linewidth=3 if ratio < 4 else 2)
        axes.annotate(
            str(image),
            centre(rect),
            fontsize=12 if ratio < 4 else 7,
            fontweight="bold",
            color="white",
            ha="center",
            va="center",
            path_effects=HALO,
        )


# --- SMoG -----------------------------------------------------------------------------------


def smog_groups(method: SMoG, batch: dict) -> tuple[Tensor, Tensor]:
    """``(groups1, groups2)`` ``[B]``: the SMoG group of each image's view 1 / view 2, the
    cosine argmax of the momentum projection of its global feature over the loss's current
    groups (SMoG trains view 1's prediction towards view 2's group and back)."""
    device = next(method.parameters()).device
    assigned = []
    for view in ("view1", "view2"):
        pooled = features(method.momentum_backbone, batch[view].to(device))[0]
        assigned.append(method.criterion.grouping.assign(method.momentum_projector(pooled)).cpu())
    return assigned[0], assigned[1]


def smog_figure(method: SMoG, batch: dict) -> Figure:
    groups1, groups2 = smog_groups(method, batch)
    counts = torch.bincount(groups1, minlength=method.criterion.num_groups)
    rows = [int(g) for g in counts.argsort(descending=True, stable=True)[:4] if counts[g] > 0]
    agree = int((groups1 == groups2).sum())
    figure = Figure(figsize=(1.5 * SHOWN_IMAGES, 1.75 * len(rows) + 1.6), layout="constrained")
    for subfigure, group in zip(np.atleast_1d(figure.subfigures(len(rows), 1)), rows):
        members = torch.nonzero(groups1 == group).flatten().tolist()
        shown = f", first {SHOWN_IMAGES} shown" if len(members) > SHOWN_IMAGES else ""
        subfigure.suptitle(
            f"group {group}: {len(members)} of the {len(groups1)} images{shown}",
            fontsize=9,
            x=0.01,
            ha="left",
        )
        for panel, slot in zip(subfigure.subplots(1, SHOWN_IMAGES), range(SHOWN_IMAGES)):
            panel.set_axis_off()
            if slot < len(members):
                image = members[slot]
                same = bool(groups2[image] == group)
                moved = "" if same else f"\nview 2: group {int(groups2[image])}"
                show_image(panel, batch["view1"][image], f"image {image}{moved}", fontsize=7)
                panel.set_axis_on()
                for spine in panel.spines.values():
                    spine.set(edgecolor="tab:green" if same else "tab:red", linewidth=3)
    figure.suptitle(
        f"SMoG: the batch's view-1 images by group ({int((counts > 0).sum())} of "
        f"{len(counts)} groups in use, the {len(rows)} largest shown)",
        fontsize=12,
    )
    figure.supxlabel(
        f"Group = nearest group feature (cosine) to the image's momentum projection. Green "
        f"frame: view 2 of the image falls in the same group (the target SMoG trains for), "
        f"red: it does not; {agree}/{len(groups1)} images agree. Crops and flips do not "
        f"matter here: SMoG groups whole-image embeddings.",
        fontsize=9,
        wrap=True,
    )
    return figure


FIGURES = {
    MGC: mgc_figure,
    DenseCL: densecl_figure,
    SMoG: smog_figure,
    ADCLR: adclr_figure,
    MCL: mcl_figure,
}
