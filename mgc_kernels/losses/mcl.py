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
    at level ``l`` with ratio ``r_l``, ``M_l`` montages (about ``B / r_l**2``, each image about
    once per level) each tile ``r_l x r_l`` images of the batch, downsampled by ``r_l``, into one
    image, and ``sources_l[m, s]`` is the image in slot ``s`` of montage ``m``. On a
    ``grid x grid`` token map slot ``s`` is exactly region ``s`` of
    ``mk.multigrain_pool(tokens, grid, cells=(grid // r_l,))``. Each pooled sub-image goes through
    a shared head and a level-specific predictor to give ``q_l [M_l, r_l**2, D]``; ``k [B, D]`` is
    the momentum embedding of the plain (``r = 1``) view. A sub-image of view 1 is contrasted with
    the momentum keys of view 2 of every image in the (gathered) batch, its source image's key
    being the positive, and the other way round::

        L_l(1->2) = s * mean_{m, j} CE(l2n(q1_l[m, j]) @ l2n(k2_all).T / T,
                                       sources1_l[m, j] + rank * B)
        L = sum_l w_l (L_l(1->2) + L_l(2->1)) / sum_l w_l

    ``k2_all`` is ``k2`` gathered over ranks (``G = world_size * B`` keys); the keys are detached
    here, so they get no gradient even if the caller's do (the released code computes them
    without one). ``s = loss_scale`` is ``2 T`` by default (the released scaling, MoCo v3's). The
    level weights ``w_l`` default to the released 1/2, 1/4, 1/8, 1/8 with the finest level (the
    largest ratio) last, generalised to any number of levels by :func:`default_level_weights`
    (1/2, 1/4, 1/4 for the three default levels). The two directions are summed, as in the
    released code.

    Defaults = the released configuration (T = 1.0, each cross-entropy times 2T, level weights,
    detached keys, InfoNCE over the gathered batch with the source image as positive, both
    directions summed), except where a ViT's token grid or this library's interface differs:

    - Ratios: default (1, 2, 7), because a sub-image must be a whole cell of the 14 x 14 token
      grid of a ViT at 224 px and 4, 8 do not divide 14. The released 1, 2, 4, 8 need a grid
      divisible by 8 (e.g. a CNN+FPN map of stride 4 at 224 px, 56 x 56):
      ``MCLLoss((1, 2, 4, 8), grid=56)``. With three levels the default weights are 1/2, 1/4,
      1/4.
    - Level weights are divided by their sum. The released weights sum to 1, so at the defaults
      this changes nothing; it makes the scale of ``L`` independent of user weights.
    - Sub-image features: the released model takes level ``l`` from its own FPN level (the
      coarsest ratio from the deepest map); here the caller pools one feature map per level
      (``multigrain_pool``). The loss only sees the embeddings, so either works.
    - Montages (:func:`mgc_kernels.transforms.montage`): the release fills the
      ``M_l * r_l**2`` slots with ``randperm(M_l * r_l**2) mod B`` (an image can sit twice in
      one montage; with fewer slots than images the batch's first images). Here a permutation of
      the batch fills the first ``B`` slots and the rest avoid repeats inside a montage where
      possible: every image at least once. The loss accepts any ``sources``.
    - At ratio 8 the release builds ``B / 32`` montages (each image twice); ``montage``'s default
      count is ``ceil(B / 64)`` (once). Pass ``count=`` to montage to match; the loss takes any
      ``M_l``.
    - Augmentation per level: the release makes every level's montages from a fresh
      augmentation of each image (per view) at full size, then downsamples it. That is the
      caller's part (the example below reuses the views). The reference trainer's data loader
      (``mgc_pretrain.loader.LevelViews``) draws the fresh crop and flip at full size and keeps
      every ``r``-th pixel, as released, but runs the photometric ops after the subsample, on
      the small tile (cheaper): exact for the per-pixel ops, contrast blends towards the mean of
      the kept pixels, and the blur uses sigma / ``r`` (the small-size equivalent, up to
      aliasing).
    - Keys: the released momentum encoder runs over the whole image pyramid and keeps the plain
      view's rows; the reference trainer runs it on the plain views alone. Only BatchNorm
      statistics can tell (ResNet, not ViT); the loss takes ``k`` as given.

    With ``gather_distributed=True`` the keys are all-gathered (no gradient). Each rank's loss is
    the mean over its own sub-images, so when every rank builds the same number of montages per
    level (the same local batch), the mean over ranks (what DDP optimises) is the loss of one
    process over all ranks' montages against all keys; each rank's montages draw from its own
    batch, as in the released code.

    ``MCLLoss(temperature=0.2, loss_scale=1.0)`` is MoCo v2's temperature without the scale, the
    defaults of this library's versions before the released configuration was adopted.

    Usage (two views ``x1``, ``x2`` ``[B, 3, 224, 224]``, a ViT with a 14 x 14 token grid)::

        crit = mk.MCLLoss()                                     # ratios (1, 2, 7)
        with torch.no_grad():
            k1, k2 = (momentum_head(momentum_vit(x).mean(1)) for x in (x1, x2))    # [B, D]
        q1, q2, s1, s2 = [], [], [], []
        for level, (r, cell) in enumerate(zip(crit.ratios, crit.cells)):
            for x, q, s in ((x1, q1, s1), (x2, q2, s2)):
                m, src = mk.transforms.montage(x, r)            # [M, 3, 224, 224], [M, r*r]
                tokens = vit(m)                                 # [M, 196, C], CLS dropped
                sub = mk.multigrain_pool(tokens, 14, (cell,))[0]                   # [M, r*r, C]
                q.append(predictors[level](head(sub)))          # [M, r*r, D]
                s.append(src)
        loss = crit(q1, q2, k1, k2, s1, s2)

    Args:
        ratios: montage ratio of each level, strictly increasing (coarsest first), each dividing
            ``grid``.
        level_weights: ``w_l``, one non-negative number per level with a positive sum; None for
            :func:`default_level_weights`.
        temperature: ``T``; 1.0 (the released value).
        loss_scale: ``s``, the factor on every cross-entropy; None for ``2 * temperature`` (the
            released scaling).
        grid: tokens per side of the patch grid (14 for ViT-S/16 at 224 px).
        gather_distributed: all-gather keys over ``torch.distributed`` ranks.
        backend: op backend (``None`` = the library default).
    """

    def __init__(
        self,
        ratios: Sequence[int] = (1, 2, 7),
        *,
        level_weights: Sequence[float] | None = None,
        temperature: float = 1.0,
        grid: int = 14,
        gather_distributed: bool = False,
        backend: str | None = None,
        loss_scale: float | None = None,
    ):
        super().__init__()
        self.grid = _checks.integer("grid", grid, 1)
        self.ratios = _ratios(ratios, self.grid)
        self.level_weights = (
            default_level_weights(len(self.ratios))
            if level_weights is None
            else _checks.mixing_weights(
                "level_weights", level_weights, len(self.ratios), "level of ratios"
            )
        )
        self.temperature = _checks.positive("temperature", temperature)
        self.loss_scale = (
            2.0 * self.temperature
            if loss_scale is None
            else _checks.real("loss_scale", loss_scale, 0, low_open=True, finite=True)
        )
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend

    @property
    def cells(self) -> tuple[int, ...]:
        """``multigrain_pool`` cell of each level: one sub-image of ratio ``r`` is ``grid // r``
        tokens on a side."""
        return tuple(self.grid // r for r in self.ratios)

    def extra_repr(self) -> str:
        return (
            f"ratios={self.ratios}, level_weights={self.level_weights}, "
            f"temperature={self.temperature}, loss_scale={self.loss_scale}, grid={self.grid}"
        )

    def forward(
        self,
        q1: Sequence[torch.Tensor],
        q2: Sequence[torch.Tensor],
        k1: torch.Tensor,
        k2: torch.Tensor,
        sources1: Sequence[torch.Tensor],
        sources2: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """The MCL loss (a scalar in the accumulation dtype of the inputs: fp32, or fp64).

        Args:
            q1, q2: per level, online predictions of the sub-images of the montages of view 1 /
                view 2, ``[M_l, r_l**2, D]`` in slot (= ``multigrain_pool`` region) order; any
                number ``M_l >= 1`` of montages per level and view.
            k1, k2: momentum embeddings of the plain views 1 / 2, ``[B, D]``; detached here.
            sources1, sources2: per level, the ``sources`` ``[M_l, r_l**2]`` returned by
                :func:`mgc_kernels.transforms.montage` for the montages of view 1 / view 2 (the
                ``M_l`` of the matching ``q``): indices into this rank's batch.
        """
        self._check_inputs(q1, q2, k1, k2, sources1, sources2)
        batch, dim = k1.shape
        keys1, keys2 = self._gather(k1.detach()), self._gather(k2.detach())
        offset = distributed.rank() * batch if self.gather_distributed else 0
        total = 0.0
        for level, w in enumerate(self.level_weights):
            term = 0.0
            for q, s, keys in ((q1, sources1, keys2), (q2, sources2, keys1)):
                targets = s[level].reshape(-1) + offset
                term = term + info_nce(
                    q[level].reshape(-1, dim), keys, targets, self.temperature, backend=self.backend
                )
            total = total + w * term
        return total * (self.loss_scale / sum(self.level_weights))

    def _check_inputs(self, q1, q2, k1, k2, sources1, sources2) -> None:
        levels = len(self.ratios)
        for name, x in (("q1", q1), ("q2", q2), ("sources1", sources1), ("sources2", sources2)):
            _checks.per_item(name, x, levels, "level of ratios")
        for name, k in (("k1", k1), ("k2", k2)):
            _checks.float_tensor(name, k, ndim=2, kind=" ([B, D] momentum embeddings)")
        if k2.shape != k1.shape:
            raise ValueError(
                f"k2 must have the shape of k1 {tuple(k1.shape)}, got {_checks.describe(k2)}"
            )
        batch, dim = k1.shape
        for level, r in enumerate(self.ratios):
            for view, q, s in ((1, q1[level], sources1[level]), (2, q2[level], sources2[level])):
                _check_queries(f"q{view}[{level}]", q, r, dim, k1)
                _check_sources(f"sources{view}[{level}]", s, q.shape[:2], r, batch, q.device)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.gather(x) if self.gather_distributed else x


def _ratios(ratios, grid: int) -> tuple[int, ...]:
    levels = _checks.positive_ints("ratios", ratios)
    if any(b <= a for a, b in itertools.pairwise(levels)):
        raise ValueError(
            f"ratios must be strictly increasing (coarsest level first, finest "
            f"last), got {ratios!r}"
        )
    bad = [r for r in levels if grid % r]
    if bad:
        raise ValueError(
            f"ratios must each divide grid={grid} (a sub-image must be a whole "
            f"cell of tokens), got {ratios!r}; {bad} do not"
        )
    return levels


def _check_queries(name: str, q, ratio: int, dim: int, k: torch.Tensor) -> None:
    expected = (
        f"[M, ratio**2, D] = [M, {ratio * ratio}, {dim}] for ratio {ratio} (M montages, D of k1)"
    )
    _checks.float_tensor(name, q, ndim=3, kind=f" ({expected})")
    if q.shape[0] < 1 or tuple(q.shape[1:]) != (ratio * ratio, dim):
        raise ValueError(f"{name} must be {expected}, got {_checks.describe(q)}")
    if q.dtype != k.dtype:
        raise TypeError(
            f"{name} must have the dtype of k1 and k2 ({k.dtype}), got {_checks.describe(q)}"
        )
    _checks.same_device(**{name: q, "k1": k})


def _check_sources(name: str, s, rows, ratio: int, batch: int, device) -> None:
    expected = f"[M, ratio**2] = [{rows[0]}, {rows[1]}] (M of the matching q, ratio {ratio})"
    _checks.tensor(
        name,
        s,
        ndim=2,
        dtypes=(torch.int64, torch.int32),
        kind=f" ({expected}: batch indices from montage)",
    )
    if tuple(s.shape) != tuple(rows):
        raise ValueError(f"{name} must be {expected}, got {_checks.describe(s)}")
    _checks.on_device(name, s, device)
    _checks.index_range(name, s, batch, "the images of this rank's batch")
