"""The five methods as modules: online encoder and heads, their momentum copies, the library loss.

Every method maps a batch of two views (``view1``, ``view2`` ``[B, 3, S, S]``, crop boxes
``box1``/``box2`` ``[B, 4]`` and flips ``flip1``/``flip2`` ``[B]``) to a scalar loss plus a dict
of detached terms for the log. Momentum copies are EMA targets: no gradient, updated by
:meth:`Method.update_momentum` before the momentum forward of each step (MGC's order).
:data:`PRETRAIN_METHODS` names them for ``--method`` and the run's config.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mgc_kernels as mk

from .loader import level_key
from .models import Arch, create_backbone, features, patch_tokens

Batch = dict[str, Any]


class Method(nn.Module):
    """Base: ``backbone`` (online, drop-path) and ``momentum_backbone`` (no drop-path), plus the
    heads a subclass lists in ``HEADS``; each gets a ``momentum_<name>`` copy. A subclass names
    in ``FAMILIES`` the backbone families (:attr:`Arch.family`) the trainer offers it with."""

    HEADS: tuple[str, ...] = ()
    FAMILIES: tuple[str, ...]
    level_ratios: tuple[int, ...] = ()  # montage levels the loader makes fresh views for (MCL)

    def __init__(self, arch: Arch, drop_path_rate: float):
        super().__init__()
        self.arch = arch
        self.backbone = create_backbone(arch, drop_path_rate)
        self.momentum_backbone = create_backbone(arch, 0.0)

    def make_momentum_copies(self) -> None:
        """Create ``momentum_<head>`` for every head; call once the heads exist."""
        for name in self.HEADS:
            setattr(self, f"momentum_{name}", mk.momentum_copy(getattr(self, name)))
        self.reset_momentum()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (getattr(self, name), getattr(self, f"momentum_{name}"))
            for name in ("backbone", *self.HEADS)
        ]

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Momentum weights := online weights (start of training; SMoG's resets)."""
        for online, momentum in self.momentum_pairs():
            for p_online, p_momentum in zip(online.parameters(), momentum.parameters()):
                p_momentum.copy_(p_online)
                p_momentum.requires_grad_(False)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` over the parameters (buffers such as BN
        statistics stay the momentum modules' own): :func:`mgc_kernels.update_momentum`."""
        for online, momentum in self.momentum_pairs():
            mk.update_momentum(online, momentum, m)

    def after_step(self) -> None:
        """Hook run after the optimiser step."""

    def forward(self, batch: Batch, epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class MGC(Method):
    """MGC: per granularity, projector + predictor on the pooled regions (sparse pairs or all)."""

    HEADS = ("projectors",)
    FAMILIES = ("vit",)  # published on ViTs

    def __init__(
        self,
        arch: Arch,
        drop_path_rate: float,
        *,
        cells=(1, 2, 7),
        num_pairs=(10, 10, 2),
        temperature=0.1,
        mode="sparse",
        weighting=None,
        gather_distributed=False,
        backend=None,
    ):
        super().__init__(arch, drop_path_rate)
        self.criterion = mk.MGCLoss(
            cells,
            num_pairs=num_pairs,
            temperature=temperature,
            grid=arch.grid,
            mode=mode,
            weighting=weighting,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        # The library's heads, registered under the checkpoints' names (projectors.*,
        # predictors.*); the momentum copy holds the projectors only.
        heads = mk.heads.MGCHeads(arch.embed_dim, cells, arch.head_hidden, arch.head_dim)
        self.projectors, self.predictors = heads.projectors, heads.predictors
        self.make_momentum_copies()

    def forward(self, batch: Batch, epoch: float):
        crit, grid = self.criterion, self.arch.grid
        views = (batch["view1"], batch["view2"])
        geometry = (batch["box1"], batch["flip1"], batch["box2"], batch["flip2"])
        online = [
            mk.multigrain_pool(
                patch_tokens(self.backbone, x), grid, crit.cells, backend=crit.backend
            )
            for x in views
        ]
        with torch.no_grad():
            momentum = [
                mk.multigrain_pool(
                    patch_tokens(self.momentum_backbone, x), grid, crit.cells, backend=crit.backend
                )
                for x in views
            ]
        pairs = crit.sample_pairs(*geometry) if crit.mode == "sparse" else None
        q1, q2, k1, k2 = [], [], [], []
        for c in range(len(crit.cells)):
            o1, o2 = online[0][c], online[1][c]
            m1, m2 = momentum[0][c], momentum[1][c]
            if pairs is not None:  # only the sampled regions go through the heads
                (o1, o2), (m1, m2) = pairs[c].gather(o1, o2), pairs[c].gather(m1, m2)
            proj, pred = self.projectors[c], self.predictors[c]  # BN over all [B, K] rows
            q1.append(pred(proj(o1)))
            q2.append(pred(proj(o2)))
            with torch.no_grad():
                k1.append(self.momentum_projectors[c](m1))
                k2.append(self.momentum_projectors[c](m2))
        if pairs is not None:
            return crit(q1, q2, k1, k2, pairs), {}
        return crit(q1, q2, k1, k2, boxes=geometry), {}


class DenseCL(Method):
    """DenseCL on a token grid: global head on the mean token, dense head on every token."""

    HEADS = ("global_head", "dense_head")
    FAMILIES = ("vit", "cnn")  # published on ResNet-50

    def __init__(
        self,
        arch: Arch,
        drop_path_rate: float,
        *,
        queue_size=65536,
        temperature=0.2,
        loss_lambda=0.5,
        gather_distributed=False,
        backend=None,
    ):
        super().__init__(arch, drop_path_rate)
        self.criterion = mk.DenseCLLoss(
            arch.head_dim,
            queue_size=queue_size,
            temperature=temperature,
            loss_lambda=loss_lambda,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        widths = (arch.embed_dim, arch.head_hidden, arch.head_dim)
        self.global_head = mk.heads.DenseCLGlobalHead(*widths)  # mean token -> MLP
        self.dense_head = mk.heads.DenseCLDenseHead(*widths)  # every token
        self.make_momentum_copies()

    def forward(self, batch: Batch, epoch: float):
        t1 = patch_tokens(self.backbone, batch["view1"])
        with torch.no_grad():
            t2 = patch_tokens(self.momentum_backbone, batch["view2"])
            k, dk = self.momentum_global_head(t2), self.momentum_dense_head(t2)
        q, dq = self.global_head(t1), self.dense_head(t1)
        loss, l_global, l_dense = self.criterion(q, k, dq, dk, t1.detach(), t2, return_terms=True)
        return loss, {"loss_global": l_global, "loss_dense": l_dense}


class SMoG(Method):
    """SMoG on the global feature (a ViT's CLS token, a CNN's pooled map): projector +
    predictor, groups updated synchronously."""

    HEADS = ("projector",)
    FAMILIES = ("vit", "cnn")  # published on ResNet-50

    def __init__(
        self,
        arch: Arch,
        drop_path_rate: float,
        *,
        num_groups=3000,
        temperature=0.1,
        beta=0.99,
        reset_every=300,
        bank_size=65536,
        seed=0,
        gather_distributed=False,
        backend=None,
    ):
        super().__init__(arch, drop_path_rate)
        self.criterion = mk.SMoGLoss(
            arch.head_dim,
            num_groups=num_groups,
            temperature=temperature,
            beta=beta,
            reset_every=reset_every,
            bank_size=bank_size,
            seed=seed,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        heads = mk.heads.SMoGHeads(arch.embed_dim, arch.head_hidden, arch.head_dim)
        self.projector, self.predictor = heads.projector, heads.predictor  # checkpoint names
        self.make_momentum_copies()

    def forward(self, batch: Batch, epoch: float):
        p1, p2 = (
            self.predictor(self.projector(features(self.backbone, x)[0]))
            for x in (batch["view1"], batch["view2"])
        )
        with torch.no_grad():
            z1, z2 = (
                self.momentum_projector(features(self.momentum_backbone, x)[0])
                for x in (batch["view1"], batch["view2"])
            )
        return self.criterion(p1, z2, p2, z1), {}

    def after_step(self) -> None:
        if self.criterion.needs_reset:  # SMoG resets the momentum encoder with the groups
            self.reset_momentum()


def query_boxes(
    box1: torch.Tensor, box2: torch.Tensor, count: int, scale: tuple[float, float] = (0.1, 0.3)
) -> torch.Tensor:
    """``[B, count, 4]`` random square-ish query regions (source pixels) inside the overlap of
    the two crops, so that every query shows the same content in both views. Side lengths are
    ``scale`` times the overlap's shorter side."""
    lo = torch.maximum(box1[:, :2], box2[:, :2])
    hi = torch.minimum(box1[:, 2:], box2[:, 2:]).maximum(lo + 1)  # at least one pixel wide
    short = (hi - lo).min(1).values[:, None, None]
    side = short * torch.empty(len(box1), count, 1).uniform_(*scale).to(box1)
    start = lo[:, None] + (hi - lo)[:, None] * torch.rand(len(box1), count, 2).to(box1) * (
        1 - side / (hi - lo)[:, None]
    ).clamp_min(0)
    return torch.cat([start, start + side], -1)


def to_view(regions: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Source-pixel regions ``[B, Q, 4]`` -> ``[-1, 1]`` coordinates of the (flipped) view."""
    origin, size = box[:, None, :2], (box[:, 2:] - box[:, :2])[:, None]
    lo = (regions[..., :2] - origin) / size * 2 - 1
    hi = (regions[..., 2:] - origin) / size * 2 - 1
    mirrored = flip[:, None, None]
    x0 = torch.where(mirrored[..., 0], -hi[..., 0], lo[..., 0])
    x1 = torch.where(mirrored[..., 0], -lo[..., 0], hi[..., 0])
    return torch.stack([x0, lo[..., 1], x1, hi[..., 1]], -1)


def query_tokens(vit: nn.Module, view: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """ADCLR's query tokens ``[B, Q, C]``: each region of ``view`` (``[-1, 1]`` coordinates)
    resampled to one patch, patch-embedded, plus the position embedding at its centre."""
    b, q = regions.shape[:2]
    p = vit.patch_embed.patch_size[0]
    x0, y0, x1, y1 = regions.reshape(-1, 4).unbind(-1)
    zero = torch.zeros_like(x0)
    theta = torch.stack(
        [
            torch.stack([(x1 - x0) / 2, zero, (x0 + x1) / 2], -1),
            torch.stack([zero, (y1 - y0) / 2, (y0 + y1) / 2], -1),
        ],
        1,
    )
    images = view.repeat_interleave(q, 0)
    sample = F.affine_grid(theta.to(view.dtype), [b * q, view.shape[1], p, p], align_corners=False)
    crops = F.grid_sample(images, sample, align_corners=False)
    tokens = vit.patch_embed.norm(vit.patch_embed.proj(crops).flatten(1))
    grid = vit.patch_embed.grid_size
    table = vit.pos_embed[:, vit.num_prefix_tokens :].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    centres = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2], -1).reshape(1, b * q, 1, 2)
    pos = F.grid_sample(table.to(view.dtype), centres, align_corners=False)  # [1, C, BQ, 1]
    return (tokens + pos[0, :, :, 0].T).reshape(b, q, -1)


def encode_with_queries(vit: nn.Module, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The ViT on ``[CLS + patches | queries]``; global tokens never attend to the queries
    (:func:`mgc_kernels.query_attention_mask`), so their outputs are the plain ViT's."""
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    mask = mk.query_attention_mask(tokens.shape[1], queries.shape[1], device=x.device)
    out = torch.cat([tokens, queries.to(tokens.dtype)], 1)
    for block in vit.blocks:
        out = block(out, attn_mask=mask)
    return vit.norm(out)


class ADCLR(Method):
    """ADCLR: DINO on the CLS token plus query tokens (small crops inside both views)."""

    HEADS = ("head",)
    FAMILIES = ("vit",)  # published on ViTs; its query tokens need one

    def __init__(
        self,
        arch: Arch,
        drop_path_rate: float,
        *,
        num_prototypes=65536,
        num_queries=10,
        bottleneck=256,
        teacher_temperature=0.07,
        warmup_teacher_temperature=0.04,
        warmup_teacher_temperature_epochs=30,
        gather_distributed=False,
        backend=None,
    ):
        super().__init__(arch, drop_path_rate)
        self.num_queries = num_queries
        self.criterion = mk.ADCLRLoss(
            num_prototypes,
            teacher_temperature=teacher_temperature,
            warmup_teacher_temperature=warmup_teacher_temperature,
            warmup_teacher_temperature_epochs=warmup_teacher_temperature_epochs,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.head = mk.heads.DINOHead(arch.embed_dim, arch.head_hidden, bottleneck, num_prototypes)
        self.make_momentum_copies()

    def _encode(self, vit, head, batch, regions):
        cls, queries = [], []
        for v in ("1", "2"):
            view = batch[f"view{v}"]
            where = to_view(regions, batch[f"box{v}"], batch[f"flip{v}"])
            out = encode_with_queries(vit, view, query_tokens(vit, view, where))
            cls.append(head(out[:, 0]))  # the patch tokens need no head
            queries.append(head(out[:, -self.num_queries :]))
        return torch.stack(cls), torch.stack(queries)

    def forward(self, batch: Batch, epoch: float):
        regions = query_boxes(batch["box1"], batch["box2"], self.num_queries)
        s_cls, s_query = self._encode(self.backbone, self.head, batch, regions)
        with torch.no_grad():
            t_cls, t_query = self._encode(
                self.momentum_backbone, self.momentum_head, batch, regions
            )
        loss = self.criterion(
            s_cls,
            t_cls,
            s_query,
            t_query,
            self.head.weight(),
            self.momentum_head.weight(),
            epoch=epoch,
        )
        return loss, {}


class MCL(Method):
    """MCL on a token grid, at the released configuration's settings and cost.

    Per view, the montages of every level go through the online backbone in one forward (as the
    released code feeds its image pyramid): level ``r`` has ``ceil(B / r**2)`` montages (each
    image at least once; about ``B / r**2`` as released), tiles downsampled by nearest neighbour
    (every ``r``-th pixel), level 1 being the plain view itself. So the encoder sees
    ``sum_r ceil(B / r**2)`` images per view, about 1.27 B for ratios 1, 2, 7 (B + B/4 + B/49,
    each rounded up), plus the B plain views of the momentum encoder. Each sub-image is the
    ``multigrain_pool`` cell of its slot, through one shared projector and one predictor per
    level; keys are the momentum embeddings (momentum backbone's mean token, momentum projector)
    of the plain views. Loss: :class:`mgc_kernels.MCLLoss` at its released defaults (T = 1.0,
    cross-entropies times 2T, level weights halving to the finest level).

    Fresh augmentation per level, as released: when the batch holds the data loader's level
    views (``loader.level_key(v, r)``, made by :class:`mgc_pretrain.loader.LevelViews` for
    ``self.level_ratios``: a fresh crop, flip and photometric draw per image, level and view,
    already at ``1 / r`` of the view size), the montages of level ``r`` tile those; otherwise they
    tile nearest-downsampled copies of the plain views (one augmentation for every level).

    The ratios must divide the grid: by default those of 1, 2, 4, 7, 8 that do (1, 2, 7 on a
    ViT's 14 x 14; 1, 7 on ResNet-50's 7 x 7 at 224 px). The released code's other differences
    (FPN levels, montage filling, ratio-8 count) are listed in :class:`mgc_kernels.MCLLoss`;
    here the keys come from the plain views alone (the released momentum encoder sees the whole
    pyramid, which only matters for BatchNorm statistics, i.e. on ResNet-50, not on a ViT).
    Montage draws use torch's global RNG, which checkpoints save and restore (bit-exact resume);
    the level views come from the per-sample generator of the data stream.
    """

    HEADS = ("projector",)
    FAMILIES = ("vit", "cnn")  # published on ResNet-50

    def __init__(
        self,
        arch: Arch,
        drop_path_rate: float,
        *,
        ratios=None,
        temperature=1.0,
        loss_scale=None,
        gather_distributed=False,
        backend=None,
    ):
        super().__init__(arch, drop_path_rate)
        ratios = ratios or tuple(r for r in (1, 2, 4, 7, 8) if arch.grid % r == 0)
        self.criterion = mk.MCLLoss(
            ratios,
            temperature=temperature,
            grid=arch.grid,
            gather_distributed=gather_distributed,
            backend=backend,
            loss_scale=loss_scale,
        )
        self.projector = mk.heads.mgc_projector(arch.embed_dim, arch.head_hidden, arch.head_dim)
        self.predictors = nn.ModuleList(
            mk.heads.mgc_predictor(arch.head_dim, arch.head_hidden) for _ in ratios
        )
        self.make_momentum_copies()

    @property
    def level_ratios(self) -> tuple[int, ...]:
        """The ratios whose fresh level views the data loader should add (``batches(...,
        level_ratios=method.level_ratios)``): every ratio above 1."""
        return tuple(r for r in self.criterion.ratios if r > 1)

    def montages(
        self, batch: Batch, view: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(images [sum_l M_l, 3, S, S], sources per level [M_l, r_l**2])`` of one view: every
        level's montages, concatenated in level order (drawn from ``generator``, else torch's
        global RNG, which the checkpoint saves)."""
        plain = batch[f"view{view}"]
        tiled, sources = [], []
        for ratio in self.criterion.ratios:
            if ratio == 1:
                images, src = plain, torch.arange(len(plain), device=plain.device)[:, None]
            else:
                fresh = batch.get(level_key(view, ratio))
                if fresh is not None:
                    images, src = mk.transforms.montage(
                        fresh, ratio, resize=None, generator=generator
                    )
                else:
                    images, src = mk.transforms.montage(
                        plain, ratio, resize="nearest", generator=generator
                    )
            tiled.append(images)
            sources.append(src)
        return torch.cat(tiled), sources

    def forward(self, batch: Batch, epoch: float):
        crit, grid = self.criterion, self.arch.grid
        with torch.no_grad():
            k1, k2 = (
                self.momentum_projector(patch_tokens(self.momentum_backbone, x).mean(1))
                for x in (batch["view1"], batch["view2"])
            )
        queries, sources = [], []
        for view in (1, 2):
            images, src = self.montages(batch, view)
            tokens = patch_tokens(self.backbone, images).split([len(s) for s in src])
            queries.append(
                [
                    self.predictors[level](
                        self.projector(
                            mk.multigrain_pool(t, grid, (cell,), backend=crit.backend)[0]
                        )
                    )
                    for level, (t, cell) in enumerate(zip(tokens, crit.cells))
                ]
            )
            sources.append(src)
        return crit(queries[0], queries[1], k1, k2, sources[0], sources[1]), {}


# the trainer's methods by their --method name, in the order the command line lists them
PRETRAIN_METHODS: dict[str, type[Method]] = {
    "mgc": MGC,
    "densecl": DenseCL,
    "smog": SMoG,
    "adclr": ADCLR,
    "mcl": MCL,
}


def methods_for(family: str) -> tuple[str, ...]:
    """The names of the methods offered with backbones of ``family`` (``"vit"`` or ``"cnn"``)."""
    return tuple(name for name, method in PRETRAIN_METHODS.items() if family in method.FAMILIES)
