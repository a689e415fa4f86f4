"""MGC: Multi-Grained Contrast (Shen, Chen, Wang, 2024, arXiv:2407.02014)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import _checks, distributed
from .._dtypes import accumulate
from ..ops.correspondence import correspondence
from ..ops.geometric_info_nce import geometric_info_nce
from ..ops.info_nce import info_nce
from ..ops.region_boxes import region_boxes
from ..ops.sample_pairs import Pairs, sample_pairs
from ..options import METRICS, SAMPLE_METHODS

TINY = torch.finfo(torch.float32).tiny  # a sum of weights below this is no weight at all


class MGCLoss(nn.Module):
    """Multi-grained contrast between region features of two views of each image.

    For each granularity ``c`` (a ``c x c`` block of patch tokens) and each direction, online
    predictions ``q`` of one view's regions are contrasted with momentum projections ``k`` of the
    other view's regions over the whole (gathered) batch at temperature ``tau``; every key that is
    not a row's own positive is a negative. The total is
    ``L = sum_c w_c (L_c(1->2) + L_c(2->1)) / sum_c w_c`` with ``w_c`` = the pairs per image
    ``K_c`` by default (10, 10, 2 over 22).

    ``mode="sparse"`` (the paper's): rows are the pairs of :meth:`sample_pairs`; the positive of
    row ``r`` is the key of its own pair.
      - ``weighting="uniform"``: ``L_c = mean_r CE_r`` over the real (non-padded) pairs. This is
        what the released code trains: it multiplies a mean-reduced cross-entropy by the pair
        weights and divides by their sum, so the weights cancel. (It also averages in the padded
        rows; here they are left out, but still serve as negatives through their keys.)
      - ``weighting="overlap"``: ``L_c = sum_r w_r CE_r / sum_r w_r``, ``w_r`` the pair's overlap.
    ``mode="dense"``: every region of view 1 against every region of view 2 in the batch, with
    soft targets ``t_ij ∝ metric(region_i, region_j)`` within an image and rows weighted by
    ``rho_i = sum_j metric(i, j)`` (see :func:`mgc_kernels.geometric_info_nce`).

    With ``gather_distributed=True`` keys are all-gathered and weighted means are normalised over
    the whole gathered batch (the released code normalises per device). Each rank then returns
    ``world_size x`` its share of the global loss, so that the mean over ranks (what DDP's
    gradient averaging optimises) is exactly the loss of one process over the whole batch.

    Args:
        cells: pooling block sizes, each dividing ``grid`` (released code: 1, 2, 7).
        num_pairs: pairs per image for each cell in sparse mode (released: 10, 10, 2).
        temperature: ``tau`` (0.1).
        grid: tokens per side of the patch grid (14 for ViT-S/16 at 224 px).
        mode: ``"sparse"`` or ``"dense"``.
        weighting: sparse mode: ``"uniform"`` (default) or ``"overlap"``; dense mode is always
            overlap-weighted (``None`` picks the mode's default).
        metric: dense-mode target metric: ``"mgc"``, ``"iou"`` or ``"ioa"``.
        granularity_weights: ``w_c``; default ``num_pairs``.
        sample_method: :func:`mgc_kernels.sample_pairs` method (``"mgc"``, ``"topk"``, ``"all"``).
        gather_distributed: all-gather keys over ``torch.distributed`` ranks.
        backend: op backend (``None`` = the library default).
    """

    def __init__(
        self,
        cells: Sequence[int] = (1, 2, 7),
        *,
        num_pairs: Sequence[int] = (10, 10, 2),
        temperature: float = 0.1,
        grid: int = 14,
        mode: str = "sparse",
        weighting: str | None = None,
        metric: str = "mgc",
        granularity_weights: Sequence[float] | None = None,
        sample_method: str = "mgc",
        gather_distributed: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.cells = _checks.positive_ints("cells", cells)
        for c in self.cells:
            _checks.grid_cell(grid, c)
        self.num_pairs = _checks.positive_ints("num_pairs", num_pairs)
        _checks.per_item("num_pairs", num_pairs, len(self.cells), "cell")
        self.temperature = _checks.positive("temperature", temperature)
        self.grid = grid
        _checks.choice("mode", mode, ("sparse", "dense"))
        self.mode = mode
        self.weighting = _weighting(mode, weighting)
        _checks.choice("metric", metric, METRICS)
        self.metric = metric
        self.granularity_weights = (
            tuple(float(k) for k in self.num_pairs)
            if granularity_weights is None
            else _checks.mixing_weights(
                "granularity_weights", granularity_weights, len(self.cells), "cell"
            )
        )
        _checks.choice("sample_method", sample_method, SAMPLE_METHODS)
        self.sample_method = sample_method
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, cells={self.cells}, num_pairs={self.num_pairs}, "
            f"temperature={self.temperature}, weighting={self.weighting!r}"
        )

    def sample_pairs(
        self, boxes1, flips1, boxes2, flips2, *, backend: str | None = None
    ) -> list[Pairs]:
        """One :class:`mgc_kernels.Pairs` per cell (``[B, K_c]`` region indices and weights).

        ``backend`` overrides the loss's own for the sampling alone, e.g. ``"native"`` (C++) in
        the ``collate_fn`` of data-loader workers, where the boxes are CPU tensors."""
        backend = self.backend if backend is None else backend
        return [
            sample_pairs(
                boxes1, flips1, boxes2, flips2, self.grid, c, k, self.sample_method, backend=backend
            )
            for c, k in zip(self.cells, self.num_pairs)
        ]

    def forward(
        self,
        q1: Sequence[torch.Tensor],
        q2: Sequence[torch.Tensor],
        k1: Sequence[torch.Tensor],
        k2: Sequence[torch.Tensor],
        pairs: Sequence[Pairs] | None = None,
        boxes=None,
    ) -> torch.Tensor:
        """The MGC loss (fp32 scalar).

        Args:
            q1, q2: per cell, online predictions of view 1 / view 2 regions, ``[B, R_c, D]``.
            k1, k2: per cell, momentum projections of view 1 / view 2 regions, ``[B, R_c, D]``.
                Sparse mode: ``R_c = K_c`` rows gathered at the pairs (``pairs[c].gather``), so
                ``q1[c][b, r]`` is region ``pairs[c].idx1[b, r]`` of view 1 and ``k2[c][b, r]``
                region ``pairs[c].idx2[b, r]`` of view 2. Dense mode: every region,
                ``R_c = (grid // c)**2``, in :func:`mgc_kernels.multigrain_pool` order.
            pairs: sparse mode: the output of :meth:`sample_pairs`.
            boxes: dense mode: ``(boxes1, flips1, boxes2, flips2)`` of the two views.
        """
        self._check_inputs(q1, q2, k1, k2, pairs, boxes)
        features = zip(q1, q2, k1, k2)
        if self.mode == "sparse":
            terms = [self._sparse(*f, p) for f, p in zip(features, pairs)]
        else:
            terms = [self._dense(c, *f, *boxes) for c, f in zip(self.cells, features)]
        weights = self.granularity_weights
        return sum(w * t for w, t in zip(weights, terms)) / sum(weights)

    def _check_inputs(self, q1, q2, k1, k2, pairs, boxes) -> None:
        features = {"q1": q1, "q2": q2, "k1": k1, "k2": k2}
        for name, x in features.items():
            _checks.per_item(name, x, len(self.cells), "cell")
        if self.mode == "sparse":
            if pairs is None:
                raise ValueError(
                    "pairs is required in sparse mode: pass criterion.sample_pairs(...)"
                )
            _checks.per_item("pairs", pairs, len(self.cells), "cell")
            shapes = [tuple(p.weight.shape) for p in pairs]
            expected = [f"[B, K] = {s} like pairs[{i}]" for i, s in enumerate(shapes)]
        else:
            if boxes is None or len(boxes) != 4:
                raise ValueError("boxes=(boxes1, flips1, boxes2, flips2) is required in dense mode")
            shapes = [(len(boxes[0]), (self.grid // c) ** 2) for c in self.cells]
            expected = [f"[B, (grid // cell)**2] = {s}" for s in shapes]
        for i, (shape, what) in enumerate(zip(shapes, expected)):
            for name, x in features.items():
                _check_rows(f"{name}[{i}]", x[i], shape, what)

    def _sparse(self, q1, q2, k1, k2, pairs: Pairs) -> torch.Tensor:
        w = pairs.weight.reshape(-1).to(accumulate(q1.dtype))
        row_weights = w if self.weighting == "overlap" else (w > 0).to(w.dtype)
        return self._contrast(q1, k2, row_weights) + self._contrast(q2, k1, row_weights)

    def _contrast(self, q: torch.Tensor, k: torch.Tensor, row_weights: torch.Tensor):
        """One direction: each row of ``q`` against every (gathered) key; its own is positive."""
        q, k = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
        keys = self._gather(k)
        targets = (
            torch.arange(len(q), device=q.device) + distributed.rank() * len(q)
            if self.gather_distributed
            else torch.arange(len(q), device=q.device)
        )
        total = info_nce(
            q,
            keys,
            targets,
            self.temperature,
            row_weights=row_weights,
            reduction="sum",
            backend=self.backend,
        )
        return self._normalise(total, row_weights.sum())

    def _dense(self, cell, q1, q2, k1, k2, boxes1, flips1, boxes2, flips2) -> torch.Tensor:
        regions = (self.grid // cell) ** 2
        r1 = region_boxes(boxes1, flips1, self.grid, cell, backend=self.backend).reshape(-1, 4)
        r2 = region_boxes(boxes2, flips2, self.grid, cell, backend=self.backend).reshape(-1, 4)
        offset = distributed.rank() * len(boxes1) if self.gather_distributed else 0
        image = torch.arange(len(boxes1), device=boxes1.device).repeat_interleave(regions) + offset
        acc = accumulate(q1.dtype)
        rho12 = (
            correspondence(
                boxes1, flips1, boxes2, flips2, self.grid, cell, self.metric, backend=self.backend
            )
            .to(acc)
            .sum()
        )
        rho21 = (
            correspondence(
                boxes2, flips2, boxes1, flips1, self.grid, cell, self.metric, backend=self.backend
            )
            .to(acc)
            .sum()
        )
        return self._dense_contrast(q1, k2, r1, r2, image, rho12) + self._dense_contrast(
            q2, k1, r2, r1, image, rho21
        )

    def _dense_contrast(self, q, k, q_regions, k_regions, image, rho_total):
        q, k = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
        total = geometric_info_nce(
            q,
            self._gather(k),
            q_regions,
            self._gather(k_regions),
            image,
            self._gather(image),
            self.temperature,
            self.metric,
            reduction="sum",
            backend=self.backend,
        )
        return self._normalise(total, rho_total)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.gather(x) if self.gather_distributed else x

    def _normalise(self, total: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        """``total / sum of weights`` over the whole gathered batch (see the class docstring)."""
        if self.gather_distributed:
            return distributed.global_mean(total, weight_sum)
        return total / weight_sum.clamp_min(TINY)


def _weighting(mode: str, weighting: str | None) -> str:
    if mode == "dense":
        if weighting not in (None, "overlap"):
            raise ValueError(
                "weighting must be None or 'overlap' in dense mode (targets and rows "
                f"are weighted by overlap there), got {weighting!r}"
            )
        return "overlap"
    weighting = "uniform" if weighting is None else weighting
    _checks.choice("weighting", weighting, ("uniform", "overlap"))
    return weighting


def _check_rows(name: str, x, shape: tuple, expected: str) -> None:
    _checks.float_tensor(name, x, ndim=3, kind=f" ({expected} rows of D features)")
    if tuple(x.shape[:2]) != shape:
        raise ValueError(f"{name} must be {expected} x D, got {_checks.describe(x)}")
