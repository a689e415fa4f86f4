"""An independent re-implementation of the released MGC pipeline's approach: per-sample Python
loops for the pair sampling, materialised logits for the loss.

Written (our own code, not the released code) from the rule as the released code runs it
(docs/methods.md §1.4): boxes as
(x, y, h, w) source pixels, the crops' overlap expressed in view-1 pixels (a ``view_size``-pixel
view split into ``n`` cells of ``P = view_size / n`` pixels) with float32 arithmetic, view-1 cells
visited with an IoU-dependent stride, each visited cell's part of the overlap carried into view 2
to enumerate the view-2 cells it touches, weight ``overArea * overArea2 / (s1 + s2) * s1``, then
the top ``K`` (or zero padding). It shares no code with the library on purpose: the tests
compare the library with it, and the benchmarks time it as the released pipeline's approach
(per-sample Python loops in the data workers). The loss (:func:`contrastive_loss`,
:func:`mgc_loss`) is written from docs/methods.md §1.5 the way the released code computes it:
the whole logit matrix and a mean cross-entropy in which the pair weights cancel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

F32 = np.float32
# the released strides per cell: (ratio, low, high) for rows and for columns; cell 7 visits all
RULES = {1: ((12, 2, 8), (8, 2, 6)), 2: ((8, 2, 4), (4, 1, 3)), 7: ((1, 1, 1), (1, 1, 1))}
PAIRS = {1: 10, 2: 10, 7: 2}  # K per cell


def _span(start: float, length: float, cell: float, view_size: float) -> tuple[int, int]:
    """First and last cell index touched by [start, start + length) in view pixels."""
    end = float(F32(F32(start) + F32(length)))
    first = int(float(start) // cell)
    last = int(end // cell)
    if end % cell == 0 or end > view_size:
        last -= 1
    return first, last


def _intersect(a, b):
    """Intersection of (x, y, w, h) boxes, or None when they do not overlap (strictly)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    if ax + aw > bx and bx + bw > ax and ay + ah > by and by + bh > ay:
        x, y = max(ax, bx), max(ay, by)
        return x, y, min(ax + aw, bx + bw) - x, min(ay + ah, by + bh) - y
    return None


def candidate_pairs(
    box1, box2, flip1, flip2, n, view_size=224.0, row_rule=(12, 2, 8), col_rule=(8, 2, 6)
):
    """Every (idx1, idx2, weight) the released rule visits, in visiting order."""
    x1, y1, w1, h1 = box1[0], box1[1], box1[2] - box1[0], box1[3] - box1[1]
    x2, y2, w2, h2 = box2[0], box2[1], box2[2] - box2[0], box2[3] - box2[1]
    overlap = _intersect((x1, y1, w1, h1), (x2, y2, w2, h2))
    if overlap is None:
        return []
    ox, oy, ow, oh = overlap
    cell = view_size / n
    # the overlap relative to view 1, in view pixels, float32 as in the released code
    rx = F32(F32(ox - x1) / F32(w1)) * F32(view_size)
    ry = F32(F32(oy - y1) / F32(h1)) * F32(view_size)
    rw = F32(F32(ow) / F32(w1)) * F32(view_size)
    rh = F32(F32(oh) / F32(h1)) * F32(view_size)
    iou = F32(ow * oh) / F32(w1 * h1 + w2 * h2 - ow * oh)
    step_r = min(max(int(iou * F32(row_rule[0])), row_rule[1]), row_rule[2])
    step_c = min(max(int(iou * F32(col_rule[0])), col_rule[1]), col_rule[2])
    first_i, last_i = _span(ry, rh, cell, view_size)
    first_j, last_j = _span(rx, rw, cell, view_size)
    s1, s2 = w1 * h1 / n**2, w2 * h2 / n**2
    pairs = []
    for i in range(first_i, last_i + 1, step_r):
        for j in range(first_j, last_j + 1, step_c):
            idx1 = i * n + (n - 1 - j if flip1 else j)
            part = _intersect(
                (float(rx), float(ry), float(rw), float(rh)), (j * cell, i * cell, cell, cell)
            )
            if part is None:
                continue
            over1 = part[2] * part[3] / cell**2
            # the part in source pixels, then relative to view 2
            ax, ay = part[0] / view_size * w1 + x1, part[1] / view_size * h1 + y1
            aw, ah = part[2] / view_size * w1, part[3] / view_size * h1
            qx = max((ax - x2) / w2 * view_size, 0.0)
            qy = max((ay - y2) / h2 * view_size, 0.0)
            qw, qh = aw / w2 * view_size, ah / h2 * view_size
            first_p, last_p = _span(qy, qh, cell, view_size)
            first_q, last_q = _span(qx, qw, cell, view_size)
            for p in range(first_p, last_p + 1):
                for q in range(first_q, last_q + 1):
                    idx2 = p * n + (n - 1 - q if flip2 else q)
                    hit = _intersect((q * cell, p * cell, cell, cell), (qx, qy, qw, qh))
                    if hit is None:
                        continue
                    over2 = hit[2] * hit[3] / (qw * qh)
                    weight = over1 * over2 / (s1 + s2) * s1
                    if weight > 0:
                        pairs.append((idx1, idx2, weight))
    return pairs


def sample_pairs(box1, box2, flip1, flip2, n, k, **rule):
    """The released top-``k`` selection: the ``k`` largest weights, or all pairs padded with
    ``(0, 0, 0)``. Returned best first (the released code's order among ties is numpy's
    unstable argsort; callers compare ties as sets)."""
    pairs = candidate_pairs(box1, box2, flip1, flip2, n, **rule)
    pairs = sorted(pairs, key=lambda p: -p[2])[:k]
    return pairs + [(0, 0, 0.0)] * (k - len(pairs))


def sample_pairs_batch(boxes1, flips1, boxes2, flips2, grid: int = 14, cells=(1, 2, 7)) -> list:
    """The released data path for a batch: per image and per cell, the loops above (boxes and
    flips as CPU tensors or lists); ``[per cell: [per image: K (idx1, idx2, weight)]]``."""
    b1, b2 = boxes1.tolist(), boxes2.tolist()
    f1, f2 = [bool(f) for f in flips1], [bool(f) for f in flips2]
    out = []
    for cell in cells:
        rows, cols = RULES[cell]
        out.append(
            [
                sample_pairs(
                    b1[i],
                    b2[i],
                    f1[i],
                    f2[i],
                    grid // cell,
                    PAIRS[cell],
                    row_rule=rows,
                    col_rule=cols,
                )
                for i in range(len(b1))
            ]
        )
    return out


def contrastive_loss(q, k, weights, temperature: float):
    """The released loss of one granularity and direction: the whole ``[N, M]`` logit matrix,
    a mean-reduced cross-entropy (row ``r``'s positive is key ``r``), multiplied by the pair
    weights and divided by their sum, so that the weights cancel (docs/methods.md §1.6)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = (q @ k.T).to(torch.promote_types(q.dtype, torch.float32)) / temperature
    loss = F.cross_entropy(logits, torch.arange(len(q), device=q.device))
    weights = weights.to(loss.dtype)
    return (loss * weights).sum() / weights.sum()


def mgc_loss(
    q1,
    q2,
    k1,
    k2,
    boxes1,
    flips1,
    boxes2,
    flips2,
    grid: int = 14,
    cells=(1, 2, 7),
    temperature: float = 0.1,
):
    """The released training step's loss path: pairs from the per-sample loops, their weights
    moved to the features' device, then per cell both directions on materialised logits,
    weighted by K per cell. ``q*``/``k*`` per cell ``[B, K_c, D]`` (rows already gathered at
    the pairs, as MGCLoss takes them)."""
    pairs = sample_pairs_batch(boxes1, flips1, boxes2, flips2, grid, cells)
    total = 0.0
    for c, per_image in enumerate(pairs):
        weights = torch.tensor(
            [w for image in per_image for _, _, w in image], dtype=torch.float32
        ).to(q1[c].device)
        flat = [x[c].reshape(-1, x[c].shape[-1]) for x in (q1, q2, k1, k2)]
        total = total + PAIRS[cells[c]] * (
            contrastive_loss(flat[0], flat[3].detach(), weights, temperature)
            + contrastive_loss(flat[1], flat[2].detach(), weights, temperature)
        )
    return total / sum(PAIRS[cell] for cell in cells)
