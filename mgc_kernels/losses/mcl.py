"""MCL: Multi-Level Contrastive Learning (Guo et al., 2023, "Multi-Level Contrastive Learning for
Dense Prediction Task", arXiv:2304.02010)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from .. import _checks, distributed
from ..ops.info_nce import info_nce


def default_level_weights(levels: int) -> tuple[float, ...]:
    """The paper's level weights, coarsest level first: ``1/2, 1/4, ..., 2**-(L-1), 2**-(L-1)``.

    Each level has half the weight of the next coarser one and the two finest share the last
    share, so the weights sum to 1: four levels give the paper's 1/2, 1/4, 1/8, 1/8; three
    (ratios 1, 2, 7 on a 14 x 14 grid) give 1/2, 1/4, 1/4; one gives 1.
    """
    if levels == 1:
        return (1.0,)
    return tuple(2.0 ** -(i + 1) for i in range(levels - 1)) + (2.0 ** -(levels - 1),)


class MCLLoss(nn.Module):
    """Multi-level contrast of montage sub-images with the momentum embedding of their source image.

    The batch of each view is assembled into montages (:func:`mgc_kernels.transforms.montage`):
    at level ``l`` with ratio ``r_l``, ``r_l x r_l`` images of the batch, each downsampled by
    ``r_l``, are tiled into one image, and ``sources_l[b, s]`` is the image in slot ``s`` of
    montage ``b``. On a ``grid x grid`` token map slot ``s`` is exactly region ``s`` of
    ``mk.multigrain_pool(tokens, grid, cells=(grid // r_l,))``. Each pooled sub-image goes through
    a shared head and a level-specific predictor to give ``q_l [B, r_l**2, D]``; ``k [B, D]`` is the
    momentum embedding of the plain (``r = 1``) view. A sub-image of view 1 is contrasted with the
    momentum keys of view 2 of every image in the (gathered) batch, its source image's key being
    the positive, and the other way round::

        L_l(1->2) = mean_{b, s} CE(l2n(q1_l[b, s]) @ l2n(k2_all).T / tau,  sources1_l[b, s] + rank * B)
        L = sum_l w_l (L_l(1->2) + L_l(2->1)) / sum_l w_l

    ``k2_all`` is ``k2`` gathered over ranks (``G = world_size * B`` keys). The level weights ``w_l``
    default to the paper's 1/2, 1/4, 1/8, 1/8 with the finest level (the largest ratio) last,
    generalised to any number of levels by :func:`default_level_weights` (1/2, 1/4, 1/4 for the
    three default levels). The two directions are summed, as in :class:`MGCLoss`.

    With ``gather_distributed=True`` the keys are all-gathered with a gradient; every rank holds
    the same number of rows, so each rank's mean is ``world_size x`` its share of the global mean
    and the mean over ranks (what DDP optimises) is the loss of one process over the whole batch.

    Usage (two views ``x1``, ``x2`` ``[B, 3, 224, 224]``, a ViT with a 14 x 14 token grid)::

        crit = mk.MCLLoss()                                     # ratios (1, 2, 7)
        with torch.no_grad():
            k1, k2 = (momentum_head(momentum_vit(x).mean(1)) for x in (x1, x2))    # [B, D]
        q1, q2, s1, s2 = [], [], [], []
        for level, r in enumerate(crit.ratios):
            for x, q, s in ((x1, q1, s1), (x2, q2, s2)):
                m, src = mk.transforms.montage(x, r)            # [B, 3, 224, 224], [B, r*r]
                tokens = vit(m)                                 # [B, 196, C], CLS dropped
                sub = mk.multigrain_pool(tokens, 14, (14 // r,))[0]                # [B, r*r, C]
                q.append(predictors[level](head(sub)))          # [B, r*r, D]
                s.append(src)
        loss = crit(q1, q2, k1, k2, s1, s2)

    Args:
        ratios: montage ratio of each level, strictly increasing (coarsest first), each dividing
            ``grid`` (docs/methods.md §5 (MCL): 1, 2, 7 on a 14 x 14 grid).
        level_weights: ``w_l``, one non-negative number per level with a positive sum; None for
            :func:`default_level_weights`.
        temperature: ``tau``; 0.2 (MoCo v2's value, the baseline MCL builds on; docs/methods.md
            §5 (MCL) compares it with the released configuration).
        grid: tokens per side of the patch grid (14 for ViT-S/16 at 224 px).
        gather_distributed: all-gather keys over ``torch.distributed`` ranks.
        backend: op backend (``None`` = the library default).
    """

    def __init__(self, ratios: Sequence[int] = (1, 2, 7),
                 level_weights: Sequence[float] | None = None, temperature: float = 0.2,
                 grid: int = 14, gather_distributed: bool = False, backend: str | None = None):
        super().__init__()
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        self.grid = grid
        self.ratios = _ratios(ratios, grid)
        self.level_weights = (
            default_level_weights(len(self.ratios)) if level_weights is None else
            _checks.mixing_weights("level_weights", level_weights, len(self.ratios),
                                   "level of ratios"))
        self.temperature = _checks.positive("temperature", temperature)
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend

    @property
    def cells(self) -> tuple[int, ...]:
        """``multigrain_pool`` cell of each level: one sub-image of ratio ``r`` is ``grid // r``
        tokens on a side."""
        return tuple(self.grid // r for r in self.ratios)

    def extra_repr(self) -> str:
        return (f"ratios={self.ratios}, level_weights={self.level_weights}, "
                f"temperature={self.temperature}, grid={self.grid}")

    def forward(self, q1: Sequence[torch.Tensor], q2: Sequence[torch.Tensor], k1: torch.Tensor,
                k2: torch.Tensor, sources1: Sequence[torch.Tensor],
                sources2: Sequence[torch.Tensor]) -> torch.Tensor:
        """The MCL loss (fp32 scalar).

        Args:
            q1, q2: per level, online predictions of the sub-images of the montages of view 1 /
                view 2, ``[B, r_l**2, D]`` in slot (= ``multigrain_pool`` region) order.
            k1, k2: momentum embeddings of the plain views 1 / 2, ``[B, D]`` (no gradient is
                needed; the caller computes them under ``torch.no_grad()``).
            sources1, sources2: per level, the ``sources`` ``[B, r_l**2]`` returned by
                :func:`mgc_kernels.transforms.montage` for the montages of view 1 / view 2:
                indices into this rank's batch.
        """
        levels = len(self.ratios)
        q1, q2 = _checks.per_item("q1", q1, levels, "level of ratios"), _checks.per_item("q2", q2, levels, "level of ratios")
        sources1 = _checks.per_item("sources1", sources1, levels, "level of ratios")
        sources2 = _checks.per_item("sources2", sources2, levels, "level of ratios")
        for name, k in (("k1", k1), ("k2", k2)):
            _checks.float_tensor(name, k, ndim=2, kind=" ([B, D] momentum embeddings)")
        if k2.shape != k1.shape:
            raise ValueError(f"k2 must have the shape of k1 {tuple(k1.shape)}, got "
                             f"{_checks.describe(k2)}")
        batch, dim = k1.shape
        keys1, keys2 = self._gather(k1), self._gather(k2)
        offset = distributed.rank() * batch if self.gather_distributed else 0
        total = 0.0
        for level, (r, w) in enumerate(zip(self.ratios, self.level_weights)):
            term = 0.0
            for view, q, s, keys in ((1, q1, sources1, keys2), (2, q2, sources2, keys1)):
                rows = (batch, r * r)
                _check_queries(f"q{view}[{level}]", q[level], rows, dim, r, k1)
                _check_sources(f"sources{view}[{level}]", s[level], rows, batch, q[level].device)
                targets = s[level].reshape(-1) + offset
                term = term + info_nce(q[level].reshape(-1, dim), keys, targets, self.temperature,
                                       backend=self.backend)
            total = total + w * term
        return total / sum(self.level_weights)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.gather(x) if self.gather_distributed else x


def _ratios(ratios, grid: int) -> tuple[int, ...]:
    if isinstance(ratios, int) or not isinstance(ratios, Sequence) or not ratios or not all(
            isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty sequence of positive ints, got {ratios!r}")
    if any(b <= a for a, b in itertools.pairwise(ratios)):
        raise ValueError(f"ratios must be strictly increasing (coarsest level first, finest "
                         f"last), got {ratios!r}")
    bad = [r for r in ratios if grid % r]
    if bad:
        raise ValueError(f"ratios must each divide grid={grid} (a sub-image must be a whole "
                         f"cell of tokens), got {ratios!r}; {bad} do not")
    return tuple(ratios)


def _check_queries(name: str, q, rows: tuple[int, int], dim: int, ratio: int,
                   k: torch.Tensor) -> None:
    expected = f"[B, ratio**2, D] = [{rows[0]}, {rows[1]}, {dim}] for ratio {ratio}"
    _checks.float_tensor(name, q, ndim=3, kind=f" ({expected})")
    if tuple(q.shape) != (*rows, dim):
        raise ValueError(f"{name} must be {expected} (B and D of k1), got {_checks.describe(q)}")
    if q.dtype != k.dtype:
        raise TypeError(f"{name} must have the dtype of k1 and k2 ({k.dtype}), got "
                        f"{_checks.describe(q)}")
    _checks.same_device(**{name: q, "k1": k})


def _check_sources(name: str, s, rows: tuple[int, int], batch: int, device) -> None:
    expected = f"[B, ratio**2] = [{rows[0]}, {rows[1]}]"
    _checks.tensor(name, s, ndim=2, dtypes=(torch.int64, torch.int32),
                   kind=f" ({expected} batch indices from montage)")
    if tuple(s.shape) != rows:
        raise ValueError(f"{name} must be {expected}, got {_checks.describe(s)}")
    _checks.on_device(name, s, device)
    _checks.index_range(name, s, batch, "the images of this rank's batch")
