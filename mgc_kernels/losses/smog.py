"""SMoG: Synchronous Momentum Grouping.

Pang, Zhang, Li, Cai, Lu: "Unsupervised Visual Representation Learning by
Synchronous Momentum Grouping", ECCV 2022 (arXiv:2207.06167).

Instead of contrasting instances, SMoG contrasts each image with ``K`` group features: the target
of an image is the group of its momentum feature, the groups follow the online features by a
momentum update made in the same step (synchronously), and every ``T`` iterations the groups are
re-initialised by k-means over recent features. This module holds the three pieces:

- :class:`SMoGGroups`: the group features (a buffer), assignment by argmax cosine, the
  synchronous momentum update and the k-means reset;
- :class:`FeatureBank`: a ring buffer of recent (gathered) momentum features for the reset;
- :class:`SMoGLoss`: the loss of one training step, built on :func:`mgc_kernels.info_nce` with
  the groups as keys (``variant="smog"``, the default), or lightly's SMoG step reproduced
  exactly (``variant="lightly"``; see the class docstring for both and for why the default
  chooses as it does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import _checks, distributed
from .._dtypes import accumulate
from ..ops.info_nce import info_nce

__all__ = ["FeatureBank", "SMoGGroups", "SMoGLoss", "spherical_kmeans"]

_CHUNK_ELEMENTS = 1 << 24  # similarity entries per chunk when matching many features to groups
VARIANTS = ("smog", "lightly")
GROUP_INITS = ("normal", "uniform")
# lightly's SMoGPrototypes.assign_groups takes the argmax of its logits at the default
# temperature of SMoGPrototypes.forward, 0.1; dividing by it too breaks near-ties identically
_LIGHTLY_ASSIGN_TEMPERATURE = 0.1


# ----------------------------------------------------------------------------- validation


def _features(name: str, x, dim: int, kind: str) -> torch.Tensor:
    _checks.float_tensor(name, x, ndim=2, kind=f" ([N, D] {kind})")
    _checks.dim_size(name, x, 1, dim, "the group feature width D")
    return x


def _on_module_device(name: str, x: torch.Tensor, state: torch.Tensor) -> None:
    if x.device != state.device:
        raise ValueError(
            f"{name} is on {x.device} but the SMoG state (groups) is on "
            f"{state.device}; move the module with .to(device)"
        )


# ----------------------------------------------------------------------------- k-means


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _nearest(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max_k x_i . c_k, argmax_k x_i . c_k)`` per row of ``x`` (rows in chunks; ties go to the
    lowest ``k``)."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, len(centres)))
    best, index = [], []
    for part in x.split(rows):
        sim = part @ centres.T
        i = sim.argmax(1)
        index.append(i)
        best.append(sim.gather(1, i[:, None]).squeeze(1))
    return torch.cat(best), torch.cat(index)


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with the cosine distance ``1 - x . c`` (rows of ``x`` are unit)."""
    n = len(x)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[:1] = torch.randint(n, (1,), generator=generator, device=x.device)
    best = x @ x[chosen[0]]
    for j in range(1, k):
        weight = (1 - best).clamp_min(0).square()
        # every point already a centre (duplicates): draw uniformly instead of from zeros
        weight = weight + (weight.sum() <= 0).to(weight.dtype)
        pick = torch.multinomial(weight, 1, generator=generator)
        chosen[j : j + 1] = pick
        best = torch.maximum(best, (x @ x[pick].T).squeeze(1))
    return x[chosen]


def _reseed_empty(
    centres: torch.Tensor, empty: torch.Tensor, x: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """Empty clusters take the worst-fitting points (lowest cosine to their own centre), the
    ``j``-th empty cluster (in index order) the ``j``-th worst point: distinct points, no host
    sync. Needs ``len(x) >= len(centres)``."""
    order = torch.argsort(best, stable=True)
    slot = (torch.cumsum(empty.long(), 0) - 1).clamp_min(0)
    return torch.where(empty[:, None], x[order[slot]], centres)


def spherical_kmeans(
    features: torch.Tensor,
    num_clusters: int,
    iters: int = 10,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical (cosine) k-means in torch, on the features' device.

    Rows are L2-normalised; a point joins the centre of highest cosine; a centre is the
    L2-normalised sum (equivalently mean) of its points. Seeding is k-means++ with the distance
    ``1 - cos`` drawn from ``generator`` (default: a new generator on the features' device
    seeded with ``seed``), so the result is deterministic for a given seed and device. ``init``
    (``[K, D]``) replaces the seeding. After each of the ``iters`` Lloyd steps a cluster left
    empty is re-seeded with a point that fits its own centre worst (lowest cosine), a different
    point for each empty cluster, so no centre is ever a mean of nothing.

    Computed in fp32 (fp64 for fp64 input); similarities are formed in row chunks of at most
    ``2**24`` entries. Returns ``(centres [K, D], assignments [N])`` (centres unit-norm).
    """
    _checks.float_tensor("features", features, ndim=2, kind=" ([N, D] features to cluster)")
    num_clusters = _checks.integer("num_clusters", num_clusters, 1)
    iters = _checks.integer("iters", iters, 0)
    if len(features) < num_clusters:
        raise ValueError(
            f"k-means into num_clusters={num_clusters} groups needs at least that "
            f"many features, got {_checks.describe(features)}"
        )
    x = _l2n(features.detach().to(accumulate(features.dtype)))
    if init is not None:
        _checks.float_tensor("init", init, ndim=2, kind=" ([K, D] initial centres)")
        if tuple(init.shape) != (num_clusters, x.shape[1]):
            raise ValueError(
                f"init must be [num_clusters={num_clusters}, D={x.shape[1]}], got "
                f"{_checks.describe(init)}"
            )
        _checks.on_device("init", init, x.device)
        centres = _l2n(init.detach().to(x.dtype))
    else:
        if generator is None:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(seed)
        centres = _kmeans_plus_plus(x, num_clusters, generator)
    for _ in range(iters):
        best, assign = _nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters)
        centres = _reseed_empty(_l2n(sums), counts == 0, x, best)
    return centres, _nearest(x, centres)[1]


# ----------------------------------------------------------------------------- modules


class SMoGGroups(nn.Module):
    """``K`` group features of width ``D`` with SMoG's synchronous momentum update.

    The groups live in the buffer ``groups [K, D]`` (no gradient, saved in the ``state_dict``;
    unit rows, except rows of ``init="uniform"`` that no update or reset has touched yet, and
    whatever a caller copies in). At construction they are drawn from a CPU generator seeded
    with ``seed``, so every rank starts from the same groups: ``init="normal"`` (default)
    normalised Gaussian rows, i.e. uniform on the unit sphere; ``init="uniform"`` the rows of
    ``torch.rand(K, D)`` (uniform in ``[0, 1)^D``, NOT normalised), the initial groups of
    lightly's PyTorch SMoG example (``examples/pytorch/smog.py``; equal to that example's when
    the global generator was seeded with ``seed`` and drew nothing before; lightly's Lightning
    example normalises these rows). Call :meth:`reset` with features to start from k-means instead.

    - :meth:`assign`: ``a_i = argmax_k cos(x_i, g_k)`` (ties to the lowest ``k``; the groups
      are normalised for it, so rows of any norm are compared by direction).
    - :meth:`update`: for every group ``k`` with at least one assigned feature,
      ``g_k <- l2n(beta g_k + (1 - beta) mean_{i: a_i = k} l2n(x_i))``; the other groups stay.
      Features are L2-normalised before averaging and the result is re-normalised: SMoG compares
      groups by cosine only, so the groups are kept on the unit sphere (the feature scale would
      otherwise leak into the momentum average). One ``index_add`` and one ``bincount``, no loop
      over groups. With ``gather_distributed=True`` the per-group sums and counts are summed
      over ranks (one all-reduce), so every rank applies the same update, the one a single
      process would apply to the whole batch.
    - :meth:`reset`: k-means (:func:`spherical_kmeans`) over a bank of features.

    Args:
        num_groups: ``K`` (3000 in the paper for ImageNet).
        dim: ``D``, the feature width.
        beta: group momentum (0.99).
        gather_distributed: all-reduce the update over ``torch.distributed`` ranks and broadcast
            rank 0's k-means result on :meth:`reset`.
        seed: seed of the random initial groups.
        init: ``"normal"`` (random unit rows) or ``"uniform"`` (lightly's ``torch.rand`` rows).
    """

    def __init__(
        self,
        num_groups: int = 3000,
        *,
        dim: int = 128,
        beta: float = 0.99,
        gather_distributed: bool = False,
        seed: int = 0,
        init: str = "normal",
    ):
        super().__init__()
        self.num_groups = _checks.integer("num_groups", num_groups, 1)
        self.dim = _checks.integer("dim", dim, 1)
        self.beta = _checks.real("beta", beta, 0, 1, high_open=True)
        self.gather_distributed = bool(gather_distributed)
        seed = _checks.integer("seed", seed)
        _checks.choice("init", init, GROUP_INITS)
        self.init = init
        generator = torch.Generator().manual_seed(seed)
        if init == "normal":
            groups = _l2n(torch.randn(self.num_groups, self.dim, generator=generator))
        else:
            groups = torch.rand(self.num_groups, self.dim, generator=generator)
        self.register_buffer("groups", groups)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, dim={self.dim}, beta={self.beta}, init={self.init!r}"

    @torch.no_grad()
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """``argmax_k cos(features_i, g_k)`` as a LongTensor ``[N]`` (no gradient)."""
        _features("features", features, self.dim, "features to assign")
        _on_module_device("features", features, self.groups)
        dtype = torch.promote_types(accumulate(features.dtype), self.groups.dtype)
        return _nearest(_l2n(features.detach().to(dtype)), _l2n(self.groups.to(dtype)))[1]

    @torch.no_grad()
    def update(self, features: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
        """The synchronous momentum update (see the class docstring); returns ``groups``.

        ``features [N, D]`` are this rank's online features, ``assignments [N]`` their groups.
        """
        _features("features", features, self.dim, "online features")
        _checks.tensor(
            "assignments",
            assignments,
            ndim=1,
            dtypes=(torch.int64, torch.int32),
            kind=" ([N] group indices)",
        )
        _checks.dim_size("assignments", assignments, 0, len(features), "one group per feature")
        _on_module_device("features", features, self.groups)
        _checks.on_device("assignments", assignments, features.device)
        _checks.index_range("assignments", assignments, self.num_groups, "the groups")
        dtype = torch.promote_types(accumulate(features.dtype), self.groups.dtype)
        x = _l2n(features.detach().to(dtype))
        assignments = assignments.long()
        stats = torch.zeros(self.num_groups, self.dim + 1, dtype=dtype, device=x.device)
        stats[:, :-1].index_add_(0, assignments, x)
        stats[:, -1] = torch.bincount(assignments, minlength=self.num_groups).to(dtype)
        if self.gather_distributed:
            stats = distributed.all_reduce_sum(stats)
        sums, counts = stats[:, :-1], stats[:, -1:]
        old = self.groups.to(dtype)
        moved = _l2n(self.beta * old + (1 - self.beta) * sums / counts.clamp_min(1))
        self.groups.copy_(torch.where(counts > 0, moved, old))
        return self.groups

    @torch.no_grad()
    def reset(
        self,
        features: torch.Tensor,
        iters: int = 10,
        *,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Re-initialise the groups by spherical k-means over ``features [N >= K, D]``.

        Deterministic for a given ``seed`` (or ``generator``, on the features' device) and
        device; empty clusters are re-seeded from the worst-fitting features (see
        :func:`spherical_kmeans`). With ``gather_distributed=True`` rank 0's result is broadcast,
        so the ranks agree even if their features (or last bits) differ. Returns the
        assignments of ``features`` to the new groups.
        """
        _features("features", features, self.dim, "features to cluster")
        _on_module_device("features", features, self.groups)
        if len(features) < self.num_groups:
            raise ValueError(
                f"reset needs at least num_groups={self.num_groups} features to "
                f"cluster, got {_checks.describe(features)}"
            )
        centres, assign = spherical_kmeans(
            features, self.num_groups, iters, seed=seed, generator=generator
        )
        self.groups.copy_(centres)
        if self.gather_distributed and distributed.world_size() > 1:
            dist.broadcast(self.groups, src=0)
        return assign


class FeatureBank(nn.Module):
    """A ring buffer of the last ``size`` feature rows (L2-normalised), saved in the state_dict.

    Buffers: ``features [size, D]``, ``ptr`` (next row to write) and ``count`` (rows filled,
    at most ``size``). :meth:`push` runs on the device without a host sync; :meth:`valid`
    returns the filled rows (one sync to read ``count``).
    """

    def __init__(self, size: int, *, dim: int):
        super().__init__()
        self.size = _checks.integer("bank_size", size, 1)
        self.dim = _checks.integer("dim", dim, 1)
        self.register_buffer("features", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Append the rows of ``x`` (the oldest rows are overwritten once full)."""
        _features("x", x, self.dim, "features for the bank")
        x = _l2n(x.detach().to(accumulate(x.dtype)))[-self.size :].to(self.features.dtype)
        n = len(x)
        rows = (self.ptr + torch.arange(n, device=x.device)) % self.size
        self.features.index_copy_(0, rows, x)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_((self.count + n).clamp_max(self.size))

    def valid(self) -> torch.Tensor:
        """The filled rows, ``[count, D]`` (oldest first only until the ring wraps)."""
        return self.features[: int(self.count)]


class SMoGLoss(nn.Module):
    """The SMoG loss of one training step, with its groups, bank and reset schedule.

    **variant="smog"** (default). For online predictions ``p1`` of view 1 and momentum features
    ``z2`` of view 2 (``N`` rows each, the same images in the same order):

        a_i = argmax_k cos(z2_i, g_k)                          groups before this step
        g_k <- l2n(beta g_k + (1 - beta) mean_{i: a_i = k} l2n(p1_i))   every k with a member
        L(1->2) = mean_i CE(l2n(p1_i) . l2n(G)^T / tau, a_i)   G after the update

    computed as ``info_nce(p1, G.detach(), targets=a, temperature=tau)`` (the groups get no
    gradient). Each image's ONLINE feature (its detached query ``p1_i``) updates the group that
    its MOMENTUM feature was assigned to, i.e. the group it is trained to predict. If you have no
    predictor, pass the online projections as ``p1``.

    ``symmetric=True`` (the default for this variant) also takes ``p2`` and ``z1`` and returns
    the MEAN of the two directions, ``(L(1->2) + L(2->1)) / 2`` (the scale of one direction, so
    ``tau`` and the learning rate need no change). Both directions are assigned with the groups
    before the step and the groups take ONE momentum step over the rows of both directions
    (``p1`` rows under ``a(z2)``, ``p2`` rows under ``a(z1)``), so the result does not depend on
    an order. For the alternating schedule use ``symmetric=False`` and swap the views every
    other step.

    Why these choices. The paper (Pang et al., ECCV 2022) fixes the parts this variant
    takes as given: a group-level InfoNCE of an online feature against the ``K`` group features
    with cosine logits at temperature ``tau``, the positive being the group of the sample's
    momentum-branch feature (nearest group by similarity); group features that are not learnt
    but follow the features by a momentum average with ``beta``, in the same iteration as the
    loss ("synchronous"); a k-means re-initialisation of the groups, with a reset of the
    momentum encoder, every ``T`` iterations. It does not fix, in the text this library works
    from, three details of the update, which the library chooses and argues as follows:

    - which rows move which group: the paper states the update as a momentum average of the
      features assigned to a group, without saying which assignment and which branch's
      features. Here a row moves the group that the loss makes its positive (``a_i``, from the
      momentum feature): one assignment per row, taken from the slowly moving branch that the
      method trusts for targets, so the grouping the loss enforces and the grouping the update
      follows are the same partition of the batch. Assigning the online row again by its own
      nearest group (lightly's choice) gives a second partition that disagrees with the
      targets on many rows (44 of 96 in one measured step from the same groups): those rows
      pull a group they are not trained towards. The moving rows are the online queries, the
      vectors the groups are compared with in the loss, so groups and queries live in one
      space, and the online branch is the one that is learning in this step ("synchronous");
      which head's output (projection or prediction) the paper does not say.
    - normalisation: the loss compares groups by cosine only, so a group's norm carries no
      meaning for the loss, but in an unnormalised average it decides how much the old group
      weighs against the new mean. With unit groups (k-means centres are normalised) and raw
      features of norm ``r`` the effective momentum is ``beta / (beta + (1 - beta) r)``, not
      ``beta``: for batch-normalised 128-d projections (``r`` about 11) and ``beta = 0.99`` the
      new mean takes about 10 % instead of 1 %, and the share drifts as the norms drift.
      Averaging unit rows and re-normalising keeps the groups on the sphere, and ``beta`` means
      the same momentum at every step. The paper is silent on normalisation in the update.
    - gradient: the paper treats the groups like the momentum encoder, as a moving average and
      not as parameters; its loss has no term that moves a group by back-propagation. Here the
      updated groups are detached, so the gradient reaches only the queries. (Letting it flow
      through the ``(1 - beta)`` share, as lightly's code does, adds a gradient to the online
      features that the paper does not write down.) The paper is silent on this point too.

    **variant="lightly"**: lightly's SMoG step, exactly (``SMoGPrototypes`` of lightly 1.6.0,
    the same in 1.5.26, driven as lightly's ``examples/pytorch/smog.py`` drives it:
    ``assign_groups`` on the momentum projections, ``get_updated_group_features`` on the online
    projections, its ``forward`` on the predictions with the updated groups,
    ``set_group_features``, ``CrossEntropyLoss``): the same loss, gradients and stored groups
    for the same inputs and groups. It needs a third input,
    the keyword ``proj1``, the ONLINE projections of view 1 (the predictor's input, lightly's
    ``x0_encoded``; pass ``proj1=p1`` if there is no predictor):

        a_i = argmax_k cos(z2_i, g_k)                          targets, groups before this step
        b_i = argmax_k cos(proj1_i, g_k)                       each projection's own group
        g'_k = beta g_k + (1 - beta) mean_{i: b_i = k} proj1_i     every k with a member
        L = mean_i CE(l2n(p1_i) . l2n(G')^T / tau, a_i);  store G' as it is

    The mean is of the raw rows and ``G'`` is stored without re-normalisation; ``G'`` keeps the
    autograd graph, so the gradient reaches ``proj1`` through the ``(1 - beta)`` share besides
    reaching ``p1`` (``z2`` gets none). Both argmaxes divide the cosines by 0.1 first, as
    lightly's ``assign_groups`` does, so near-ties break the same way. Computed with plain torch
    ops on the ``[N, K]`` logits like lightly (no fused kernel; ``backend`` is unused), in fp32
    (fp64 for fp64 inputs). The rest of lightly's recipe:

    - one direction per step: ``symmetric`` defaults to False and True is refused (the example
      swaps the two views every other step: do the same with your inputs);
    - ``gather_distributed=True`` is refused: ``SMoGPrototypes`` has no cross-rank update, and
      under DDP each rank moves its own groups, which ``gather_distributed=False`` reproduces;
    - initial groups: ``SMoGGroups(init="uniform")``, the example's ``torch.rand(K, D)`` rows;
    - the bank takes the online projections ``proj1`` (what the example banks), and the reset
      schedule is the one below; the example resets at the start of the step after every
      ``reset_every``-th, which is the moment this loss resets (after the ``reset_every``-th
      forward, before the next one). The example clusters with scikit-learn's ``KMeans``
      (Euclidean, on the raw projections, its own random seeding, over the whole bank including
      initial random rows not yet overwritten) and normalises the centres; this loss runs its
      seeded spherical k-means instead. To reproduce the example's reset exactly, build with
      ``reset_every=0, bank_size=0``, keep lightly's ``MemoryBankModule`` fed with ``proj1``,
      and at that moment copy the normalised ``KMeans`` centres into ``group_features``.

    Training-mode forwards (``module.train()``) update the groups, push the banked features
    (``z2``, ``z1`` for ``"smog"``; ``proj1`` for ``"lightly"``) to the bank, and advance the
    iteration counter; every ``reset_every`` iterations (after that step's update) the groups
    are re-initialised by spherical k-means over the bank (seed ``seed + iteration``, so a
    resumed run resets identically). The paper resets the momentum encoder to the online encoder
    at the same moment; that is the caller's job:

        loss = criterion(p1, z2, p2, z1)
        ...backward, optimiser step...
        if criterion.needs_reset:      # True right after a forward that reset the groups
            momentum_encoder.load_state_dict(online_encoder.state_dict())

    ``eval()`` forwards only compute the loss against the current groups (no update; ``proj1``
    is then not needed).

    With ``gather_distributed=True`` (``"smog"`` only) the group update is summed over ranks and
    the bank takes the all-gathered momentum features (all ranks must pass the same ``N``), so
    every rank holds the same groups and bank, equal to one process over the whole batch. Each
    rank returns ``world_size x`` its share of the global mean, so the mean over ranks (what
    DDP's gradient averaging optimises) is the one-process loss.

    State (buffers, restored exactly by ``load_state_dict``): ``grouping.groups``,
    ``bank.features``, ``bank.ptr``, ``bank.count`` and ``iteration``.

    Args:
        dim: ``D``, width of ``p`` and ``z`` (128).
        num_groups: ``K`` (3000).
        temperature: ``tau`` (0.1).
        beta: group momentum (0.99).
        reset_every: iterations between k-means resets (300); 0 never resets.
        bank_size: features kept for the reset (65536; at least ``num_groups`` when
            resetting; 0 keeps no bank and needs ``reset_every=0``).
        kmeans_iters: Lloyd iterations per reset (10).
        symmetric: both view directions or only ``p1`` against ``a(z2)``; ``None`` (default)
            is True for ``"smog"`` and False for ``"lightly"`` (which refuses True).
        gather_distributed: synchronise groups and bank over ``torch.distributed`` ranks
            (``"smog"`` only).
        seed: seed of the initial groups and of the k-means resets.
        backend: ``info_nce`` backend (``None`` = the library default; ``"smog"`` only).
        variant: ``"smog"`` (default: this library's reading of the paper) or ``"lightly"``
            (lightly's step, exactly).
    """

    def __init__(
        self,
        dim: int = 128,
        *,
        num_groups: int = 3000,
        temperature: float = 0.1,
        beta: float = 0.99,
        reset_every: int = 300,
        bank_size: int = 65536,
        kmeans_iters: int = 10,
        symmetric: bool | None = None,
        gather_distributed: bool = False,
        seed: int = 0,
        backend: str | None = None,
        variant: str = "smog",
    ):
        super().__init__()
        _checks.choice("variant", variant, VARIANTS)
        num_groups = _checks.integer("num_groups", num_groups, 1)
        self.temperature = _checks.positive("temperature", temperature)
        self.reset_every = _checks.integer("reset_every", reset_every, 0)
        self.kmeans_iters = _checks.integer("kmeans_iters", kmeans_iters, 1)
        bank_size = _checks.integer("bank_size", bank_size, 0)
        if self.reset_every and bank_size < num_groups:
            raise ValueError(
                f"bank_size must be at least num_groups={num_groups} to re-cluster "
                f"every reset_every={reset_every} iterations, got {bank_size!r}"
            )
        if symmetric is None:
            symmetric = variant == "smog"
        _checks.flag("symmetric", symmetric)
        if variant == "lightly" and symmetric:
            raise ValueError(
                "variant='lightly' is one direction per step (lightly's SMoG example "
                "swaps the views every other step): symmetric must be False or None"
            )
        if variant == "lightly" and gather_distributed:
            raise ValueError(
                "variant='lightly' has no cross-rank group update (lightly's "
                "SMoGPrototypes moves each rank's own groups): gather_distributed "
                "must be False"
            )
        self.variant = variant
        self.symmetric = symmetric
        self.gather_distributed = bool(gather_distributed)
        self.seed = _checks.integer("seed", seed)
        self.backend = backend
        self.grouping = SMoGGroups(
            num_groups,
            dim=dim,
            beta=beta,
            gather_distributed=self.gather_distributed,
            seed=self.seed,
            init="uniform" if variant == "lightly" else "normal",
        )
        self.bank = FeatureBank(bank_size, dim=dim) if bank_size else None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self._iteration = 0  # host mirror of `iteration`: the schedule needs no device sync
        self.register_load_state_dict_post_hook(_sync_iteration)

    @property
    def num_groups(self) -> int:
        return self.grouping.num_groups

    @property
    def dim(self) -> int:
        return self.grouping.dim

    @property
    def beta(self) -> float:
        return self.grouping.beta

    @property
    def group_features(self) -> torch.Tensor:
        """The current groups ``[K, D]`` (the buffer itself)."""
        return self.grouping.groups

    @property
    def needs_reset(self) -> bool:
        """True after a training forward that re-clustered the groups (every ``reset_every``
        iterations), until the next one: time to reset the momentum encoder to the online one."""
        return (
            bool(self.reset_every)
            and self._iteration > 0
            and self._iteration % self.reset_every == 0
        )

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, dim={self.dim}, temperature={self.temperature}, "
            f"beta={self.beta}, reset_every={self.reset_every}, symmetric={self.symmetric}, "
            f"variant={self.variant!r}"
        )

    def forward(
        self,
        p1: torch.Tensor,
        z2: torch.Tensor,
        p2: torch.Tensor | None = None,
        z1: torch.Tensor | None = None,
        *,
        proj1: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The SMoG loss (fp32 scalar; fp64 for fp64 inputs).

        Args:
            p1: online predictions of view 1, ``[N, D]`` (the queries; they get the gradient).
            z2: momentum features of view 2, ``[N, D]`` (they pick the targets).
            p2, z1: the same for the other direction; required when ``symmetric``, refused
                otherwise.
            proj1: ``variant="lightly"`` only: online projections of view 1, ``[N, D]`` (they
                move the groups, with gradient); required in training mode.
        """
        directions = self._check_inputs(p1, z2, p2, z1, proj1)
        if self.variant == "lightly":
            return self._lightly_step(p1, z2, proj1)
        targets = [self.grouping.assign(z) for _, z in directions]
        if self.training:
            self.grouping.update(torch.cat([p for p, _ in directions]), torch.cat(targets))
        groups = self.grouping.groups.detach()
        total = sum(
            info_nce(
                p, groups.to(p.dtype), t, self.temperature, reduction="sum", backend=self.backend
            )
            for (p, _), t in zip(directions, targets)
        )
        loss = self._normalise(total, len(directions) * len(p1))
        if self.training:
            self._advance([z for _, z in directions])
        return loss

    def _check_inputs(self, p1, z2, p2, z1, proj1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Checks :meth:`forward`'s inputs; returns the directions it contrasts, ``(p1, z2)``
        and, when symmetric, ``(p2, z1)``."""
        directions = [("p1", p1, "z2", z2)]
        if self.symmetric:
            if p2 is None or z1 is None:
                raise ValueError(
                    "p2 and z1 are required with symmetric=True (or build the loss "
                    "with symmetric=False)"
                )
            directions.append(("p2", p2, "z1", z1))
        elif p2 is not None or z1 is not None:
            raise ValueError("p2 and z1 are only used with symmetric=True")
        for pn, p, zn, z in directions:
            _features(pn, p, self.dim, "online predictions")
            _features(zn, z, self.dim, "momentum features")
            if z.shape != p.shape:
                raise ValueError(
                    f"{zn} must have the shape of {pn} {tuple(p.shape)} (one momentum "
                    f"feature per online row), got {_checks.describe(z)}"
                )
            if p.shape != p1.shape:
                raise ValueError(
                    f"{pn} must have the shape of p1 {tuple(p1.shape)}, got {_checks.describe(p)}"
                )
            _on_module_device(pn, p, self.grouping.groups)
            _checks.same_device(**{pn: p, zn: z})
        if self.variant == "lightly":
            self._check_projections(p1, proj1)
        elif proj1 is not None:
            raise ValueError("proj1 is only used with variant='lightly'")
        return [(p, z) for _, p, _, z in directions]

    def _check_projections(self, p1: torch.Tensor, proj1: torch.Tensor | None) -> None:
        """``variant="lightly"``: ``proj1`` is like ``p1``, and required in training mode."""
        if proj1 is None:
            if self.training:
                raise ValueError(
                    "variant='lightly' needs proj1=, the online projections of "
                    "view 1 that move the groups (lightly's x0_encoded; pass "
                    "proj1=p1 if there is no predictor)"
                )
            return
        _features("proj1", proj1, self.dim, "online projections")
        if proj1.shape != p1.shape:
            raise ValueError(
                f"proj1 must have the shape of p1 {tuple(p1.shape)}, got {_checks.describe(proj1)}"
            )
        _checks.same_device(p1=p1, proj1=proj1)

    def _lightly_step(
        self, p1: torch.Tensor, z2: torch.Tensor, proj1: torch.Tensor | None
    ) -> torch.Tensor:
        """``variant="lightly"`` (see the class docstring)."""
        dtype = torch.promote_types(accumulate(p1.dtype), self.grouping.groups.dtype)
        groups = self.grouping.groups.detach().to(dtype, copy=True)
        with torch.no_grad():
            targets = _lightly_nearest(z2.to(dtype), groups)
        if self.training:
            groups = _lightly_moved(groups, proj1.to(dtype), self.beta)
        logits = _l2n(p1.to(dtype)) @ _l2n(groups).T / self.temperature
        loss = F.cross_entropy(logits, targets)
        if self.training:
            self.grouping.groups.copy_(groups.detach())
            self._advance([proj1])
        return loss

    def _normalise(self, total: torch.Tensor, rows: int) -> torch.Tensor:
        """``total / rows`` over the whole gathered batch (see the class docstring)."""
        if not self.gather_distributed or distributed.world_size() == 1:
            return total / rows
        return distributed.global_mean(total, total.new_tensor(float(rows)))

    @torch.no_grad()
    def _advance(self, banked: list[torch.Tensor]) -> None:
        """Bank the (gathered) features, count the step, re-cluster on schedule."""
        if self.bank is not None:
            for z in banked:  # z2 first, then z1 ("smog"); proj1 ("lightly")
                self.bank.push(distributed.gather(z.detach()) if self.gather_distributed else z)
        self.iteration.add_(1)
        self._iteration += 1
        if self.needs_reset:
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Re-cluster the groups over the bank now (what the schedule calls)."""
        if self.bank is None:
            raise RuntimeError("SMoGLoss.reset needs a feature bank (bank_size > 0)")
        features = self.bank.valid()
        if len(features) < self.num_groups:
            raise RuntimeError(
                f"the feature bank holds {len(features)} features, fewer than "
                f"num_groups={self.num_groups}: reset later (a larger "
                "reset_every) or use fewer groups"
            )
        self.grouping.reset(
            features.to(self.grouping.groups.dtype),
            self.kmeans_iters,
            seed=self.seed + self._iteration,
        )


def _lightly_nearest(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """lightly's group of each row of ``x``: the argmax over ``k`` of ``cos(x_i, g_k) / 0.1``
    (ties to the lowest ``k``); one ``[N, K]`` matrix, no gradient."""
    logits = _l2n(x.detach()) @ _l2n(groups.detach()).T
    return (logits / _LIGHTLY_ASSIGN_TEMPERATURE).argmax(1)


def _lightly_moved(groups: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
    """lightly's synchronous update, differentiable w.r.t. ``x``: every group ``k`` that is the
    nearest (:func:`_lightly_nearest`) of at least one row of ``x`` becomes
    ``beta g_k + (1 - beta) mean`` of those raw rows; the others stay. Not normalised."""
    own = _lightly_nearest(x, groups)
    sums = torch.zeros_like(groups).index_add(0, own, x)
    counts = torch.bincount(own, minlength=len(groups)).to(x.dtype)[:, None]
    moved = beta * groups + (1 - beta) * (sums / counts.clamp_min(1))
    return torch.where(counts > 0, moved, groups)


def _sync_iteration(module: SMoGLoss, incompatible_keys) -> None:
    module._iteration = int(module.iteration)
