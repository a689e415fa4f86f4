"""The projection and prediction heads of the methods, with their papers' default sizes.

Plain PyTorch modules (no fused kernels): every head here is an :class:`MLP`, an
``nn.Sequential`` of ``Linear`` / ``BatchNorm1d`` / activation layers that takes ``[..., C]``
features (BatchNorm sees every row of all leading dimensions, e.g. all ``B x K`` sampled regions
of a granularity at once) and returns ``[..., D]``.

- :func:`mlp`: the generic block, ``Linear -> [BN] -> act`` between consecutive widths, a last
  ``Linear`` and optionally an affine-free BatchNorm after it.
- :class:`MGCHeads`: MGC's projector and predictor, one pair per granularity (MoCo v3's heads):
  :func:`mgc_projector` ``C -> 4096 -> 4096 -> 128`` (BN + ReLU after the hidden layers, an
  affine-free BN after the last) and :func:`mgc_predictor` ``128 -> 4096 -> 128``.
- :class:`SMoGHeads`: a projector and a predictor on the global feature (by default the same
  layers as MGC's, see the class).
- :class:`DenseCLGlobalHead`, :class:`DenseCLDenseHead`: DenseCL's two heads
  (``Linear -> ReLU -> Linear`` to 128 after global average pooling, and the same as 1x1
  convolutions at every position of the map).
- :class:`DINOHead`: DINO's head for ADCLR: an MLP to an L2-normalised bottleneck and a
  weight-normalised last layer (the prototypes) kept apart, since :func:`mgc_kernels.linear_soft_ce`
  and :class:`mgc_kernels.ADCLRLoss` take the features and the last layer's weight separately.

Every layer keeps PyTorch's default initialisation (except the DINO prototypes, see
:class:`DINOHead`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks

__all__ = [
    "DINOHead",
    "DenseCLDenseHead",
    "DenseCLGlobalHead",
    "MGCHeads",
    "MLP",
    "SMoGHeads",
    "mgc_predictor",
    "mgc_projector",
    "mlp",
]

_ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class MLP(nn.Sequential):
    """What :func:`mlp` returns: an ``nn.Sequential`` (so its ``state_dict`` keys are the layer
    indices, ``"0.weight"``, ...) that takes ``[..., C]`` inputs. With BatchNorm layers (also
    after ``nn.SyncBatchNorm.convert_sync_batchnorm``), inputs of more than two dimensions are
    flattened to rows around the layers, so the statistics are over every row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self):
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _layers(
    dims: Sequence[int], batch_norm: bool, last_batch_norm: bool, activation: str
) -> list[nn.Module]:
    dims = _checks.positive_ints("dims", dims, min_length=2)
    _checks.choice("activation", activation, tuple(_ACTIVATIONS))
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(_ACTIVATIONS[activation]())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return layers


def mlp(
    dims: Sequence[int],
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    activation: str = "relu",
) -> MLP:
    """``Linear -> [BatchNorm1d] -> activation`` between consecutive ``dims``, then a last Linear.

    Args:
        dims: the widths ``[in, hidden..., out]`` (at least two).
        batch_norm: BatchNorm after every hidden Linear; those Linears then have no bias (the
            norm's shift replaces it).
        last_batch_norm: an affine-free ``BatchNorm1d`` after the last Linear, which then has no
            bias (MoCo v3's and MGC's projector); otherwise the last Linear has a bias.
        activation: ``"relu"`` (in place) or ``"gelu"``.

    Returns an :class:`MLP` taking ``[..., dims[0]]`` to ``[..., dims[-1]]``.
    """
    return MLP(*_layers(dims, batch_norm, last_batch_norm, activation))


def mgc_projector(
    in_dim: int, hidden_dim: int = 4096, out_dim: int = 128, *, num_layers: int = 3
) -> MLP:
    """MGC's (and MoCo v3's) projector: ``num_layers`` Linears without bias, BN + ReLU after
    each hidden one, an affine-free BN after the last: ``in -> 4096 -> 4096 -> 128``."""
    in_dim = _checks.integer("in_dim", in_dim, 1)
    hidden_dim = _checks.integer("hidden_dim", hidden_dim, 1)
    out_dim = _checks.integer("out_dim", out_dim, 1)
    num_layers = _checks.integer("num_layers", num_layers, 2)
    return mlp([in_dim, *[hidden_dim] * (num_layers - 1), out_dim], last_batch_norm=True)


def mgc_predictor(dim: int = 128, hidden_dim: int = 4096) -> MLP:
    """MGC's (and MoCo v3's) predictor: ``dim -> 4096`` (no bias, BN, ReLU) ``-> dim`` (bias)."""
    dim = _checks.integer("dim", dim, 1)
    hidden_dim = _checks.integer("hidden_dim", hidden_dim, 1)
    return mlp([dim, hidden_dim, dim])


class MGCHeads(nn.Module):
    """MGC's heads: a projector (:func:`mgc_projector`) and a predictor (:func:`mgc_predictor`)
    per granularity, in ``projectors`` / ``predictors`` (``nn.ModuleList``, level ``i`` for
    ``cells[i]``; all projectors are built before the predictors).

    ``heads(x, level)`` is the online query ``predictor(projector(x))``; on the momentum copy
    (:func:`mgc_kernels.momentum_copy`), ``heads.project(x, level)`` is the key (MGC's momentum
    branch has no predictor). Both take ``[..., in_dim]`` region features, e.g. the ``[B, K, C]``
    sampled regions of ``Pairs.gather``, with BatchNorm over all of their rows.

    Defaults are the paper's ViT-S/16 heads (4096 hidden, 128 out).
    """

    def __init__(
        self,
        in_dim: int,
        cells: Sequence[int] = (1, 2, 7),
        hidden_dim: int = 4096,
        out_dim: int = 128,
    ):
        super().__init__()
        self.cells = _checks.positive_ints("cells", cells)
        self.projectors = nn.ModuleList(
            mgc_projector(in_dim, hidden_dim, out_dim) for _ in self.cells
        )
        self.predictors = nn.ModuleList(mgc_predictor(out_dim, hidden_dim) for _ in self.cells)

    def _level(self, level: int) -> int:
        """``level`` as an index into ``cells`` (negative ones count from the end)."""
        return _checks.integer("level", level, -len(self.cells), len(self.cells) - 1)

    def project(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """``[..., in_dim] -> [..., out_dim]``: the projector of granularity ``level``."""
        return self.projectors[self._level(level)](x)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """``[..., in_dim] -> [..., out_dim]``: predictor after projector of ``level``."""
        return self.predictors[self._level(level)](self.project(x, level))


class SMoGHeads(nn.Module):
    """SMoG's heads on the global feature: ``projector`` and ``predictor``.

    ``heads(x)`` is the online ``predictor(projector(x))``, ``heads.project(x)`` the momentum
    branch's. The projector is :func:`mgc_projector` (3 layers by default, as the reference
    trainer uses it); the SMoG paper's projector has 2 layers (``projector_layers=2``: Linear,
    BN, ReLU, Linear, affine-free BN); the predictor is :func:`mgc_predictor` in both. Default
    widths are the paper's ResNet-50 ones (2048 hidden, 128 out).
    """

    def __init__(
        self,
        in_dim: int = 2048,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        *,
        projector_layers: int = 3,
    ):
        super().__init__()
        self.projector = mgc_projector(in_dim, hidden_dim, out_dim, num_layers=projector_layers)
        self.predictor = mgc_predictor(out_dim, hidden_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(x))


def _dense_dims(in_dim: int, hidden_dim: int, out_dim: int) -> list[int]:
    """DenseCL's widths, each checked under its own name (``mlp`` would say ``dims[i]``)."""
    return [
        _checks.integer("in_dim", in_dim, 1),
        _checks.integer("hidden_dim", hidden_dim, 1),
        _checks.integer("out_dim", out_dim, 1),
    ]


class DenseCLGlobalHead(MLP):
    """DenseCL's global head: global average pooling, then ``Linear -> ReLU -> Linear``
    (``2048 -> 2048 -> 128``, biases, no BN).

    Takes a ``[B, C, H, W]`` map (mean over ``H, W``), ``[B, S, C]`` tokens (mean over ``S``) or
    an already pooled ``[B, C]``; returns ``[B, out_dim]``.
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__(*_layers(_dense_dims(in_dim, hidden_dim, out_dim), False, False, "relu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.mean((2, 3))
        elif x.dim() == 3:
            x = x.mean(1)
        elif x.dim() != 2:
            raise ValueError(
                f"x must be [B, C, H, W], [B, S, C] or [B, C], got shape {tuple(x.shape)}"
            )
        return super().forward(x)


class DenseCLDenseHead(MLP):
    """DenseCL's dense head: ``1x1 conv -> ReLU -> 1x1 conv`` (``2048 -> 2048 -> 128``,
    biases), at every position.

    The 1x1 convolutions are stored as ``nn.Linear`` layers (same function, same default
    initialisation; weights ``[out, in]`` rather than ``[out, in, 1, 1]``), so the head takes
    both ``[B, C, H, W]`` maps (returning ``[B, out_dim, H, W]``) and ``[..., C]`` token grids such
    as ``[B, S, C]`` (returning ``[..., out_dim]``); :class:`mgc_kernels.DenseCLLoss` takes
    either layout.
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__(*_layers(_dense_dims(in_dim, hidden_dim, out_dim), False, False, "relu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class DINOHead(nn.Module):
    """DINO's head (as ADCLR uses it): ``mlp`` (``Linear -> GELU -> Linear -> GELU -> Linear``,
    ``in -> 2048 -> 2048 -> 256``, biases, no BN) to a bottleneck that ``forward`` returns
    L2-normalised, and the last layer's weight, ``prototypes`` ``[K, bottleneck]``, kept apart.

    ``weight()`` is the weight-normalised last layer (each prototype scaled to unit norm: DINO's
    ``weight_norm`` with the gain fixed to 1), what :func:`mgc_kernels.linear_soft_ce` and
    :class:`mgc_kernels.ADCLRLoss` take next to the features; ``head(x) @ head.weight().T`` are
    the logits. Defaults are DINO's (65536 prototypes).

    Initialisation: the prototypes are truncated-normal with std 0.02 (the direction is what
    counts after the normalisation); the MLP keeps PyTorch's default (DINO uses
    truncated-normal 0.02 and zero biases there).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 65536,
    ):
        super().__init__()
        in_dim = _checks.integer("in_dim", in_dim, 1)
        hidden_dim = _checks.integer("hidden_dim", hidden_dim, 1)
        bottleneck_dim = _checks.integer("bottleneck_dim", bottleneck_dim, 1)
        num_prototypes = _checks.integer("num_prototypes", num_prototypes, 1)
        self.mlp = mlp(
            [in_dim, hidden_dim, hidden_dim, bottleneck_dim], batch_norm=False, activation="gelu"
        )
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim] -> [..., bottleneck_dim]``, unit norm along the last dimension."""
        return F.normalize(self.mlp(x), dim=-1)

    def weight(self) -> torch.Tensor:
        """``[num_prototypes, bottleneck_dim]``: the prototypes, each of unit norm."""
        return F.normalize(self.prototypes, dim=-1)
