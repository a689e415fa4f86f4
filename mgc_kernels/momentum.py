"""Momentum (EMA) encoders: the copy, its update and MGC's momentum schedule.

ema_backbone, ema_heads = mk.momentum_copy(backbone), mk.momentum_copy(heads)
for step in range(total_steps):
    m = mk.cosine_momentum(step, total_steps)           # 0.996 -> 1 on a half cosine
    mk.update_momentum(backbone, ema_backbone, m)       # before the momentum forward
    mk.update_momentum(heads, ema_heads, m)
    ...
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import _checks

__all__ = ["cosine_momentum", "momentum_copy", "update_momentum"]

_BUFFERS = ("keep", "copy")


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` for the momentum branch: the same weights and buffers, every
    parameter with ``requires_grad=False`` and no ``.grad``. Update it with
    :func:`update_momentum`; run it under ``torch.no_grad()``."""
    ema = copy.deepcopy(_checks.module("module", module))
    for p in ema.parameters():
        p.requires_grad_(False)
        p.grad = None
    return ema


def _matched(
    kind: str, online: list[tuple[str, torch.Tensor]], momentum: list[tuple[str, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(online, momentum)`` tensor pairs; the two lists have the same names and shapes."""
    if [n for n, _ in online] != [n for n, _ in momentum]:
        got, want = dict(momentum), dict(online)
        missing = [n for n in want if n not in got]
        extra = [n for n in got if n not in want]
        detail = (
            f"missing in momentum: {missing[:5]}, not in online: {extra[:5]}"
            if missing or extra
            else "the same names in another order"
        )
        raise ValueError(
            f"momentum's {kind} do not match online's ({len(momentum)} vs "
            f"{len(online)}; {detail}): pass the module and its momentum copy "
            "(mgc_kernels.momentum_copy)"
        )
    for (name, t_online), (_, t_momentum) in zip(online, momentum):
        if t_online.shape != t_momentum.shape:
            raise ValueError(
                f"momentum's {kind[:-1]} {name!r} has shape "
                f"{tuple(t_momentum.shape)} but online's has "
                f"{tuple(t_online.shape)}"
            )
    return [(o, m) for (_, o), (_, m) in zip(online, momentum)]


@torch.no_grad()
def update_momentum(
    online: nn.Module, momentum: nn.Module, m: float, *, buffers: str = "keep"
) -> None:
    """The EMA step of a momentum encoder, in place and without autograd:
    ``p_m <- m * p_m + (1 - m) * p_o`` for every parameter of ``momentum`` and its counterpart
    in ``online`` (matched by name; names and shapes must agree).

    The update is ``torch._foreach_lerp_(p_m, p_o, 1 - m)``, one fused pass per device and dtype
    (an online tensor on another device or dtype is converted first). ``lerp`` is the formula
    above rounded once, so it can differ from evaluating ``m * p_m + (1 - m) * p_o`` in two
    steps by an ulp; ``m = 1`` leaves ``p_m`` as it is and ``m = 0`` copies ``p_o``.

    Args:
        online: the trained module.
        momentum: its momentum copy (:func:`momentum_copy`).
        m: the momentum, in ``[0, 1]`` (e.g. :func:`cosine_momentum`).
        buffers: ``"keep"`` (default): the momentum module keeps its own buffers (its BatchNorm
            running statistics come from its own forwards, as in MoCo v3, MGC and the reference
            trainer); ``"copy"``: copy online's buffers into it (names and shapes must agree).
    """
    _checks.module("online", online)
    _checks.module("momentum", momentum)
    weight = 1.0 - _checks.real("m", m, 0, 1, finite=True)
    _checks.choice("buffers", buffers, _BUFFERS)
    pairs = _matched(
        "parameters", list(online.named_parameters()), list(momentum.named_parameters())
    )
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
    for p_online, p_momentum in pairs:
        if p_online.device != p_momentum.device or p_online.dtype != p_momentum.dtype:
            p_online = p_online.to(p_momentum.device, p_momentum.dtype)
        targets, sources = groups.setdefault((p_momentum.device, p_momentum.dtype), ([], []))
        targets.append(p_momentum)
        sources.append(p_online)
    for targets, sources in groups.values():
        torch._foreach_lerp_(targets, sources, weight)
    if buffers == "copy":
        for b_online, b_momentum in _matched(
            "buffers", list(online.named_buffers()), list(momentum.named_buffers())
        ):
            b_momentum.copy_(b_online)


def cosine_momentum(
    step: float, total_steps: float, start: float = 0.996, end: float = 1.0
) -> float:
    """MGC's (BYOL's, MoCo v3's) momentum schedule: ``start`` at step 0 to ``end`` at
    ``total_steps`` on a half cosine,
    ``end - (end - start) * (cos(pi * step / total_steps) + 1) / 2``.

    ``step`` may be fractional; steps past ``total_steps`` keep ``end``.
    """
    step = _checks.real("step", step, 0, finite=True)
    total_steps = _checks.real("total_steps", total_steps, 0, low_open=True, finite=True)
    start = _checks.real("start", start, 0, 1, finite=True)
    end = _checks.real("end", end, 0, 1, finite=True)
    step = min(step, total_steps)
    return end - (end - start) * (math.cos(math.pi * step / total_steps) + 1) / 2
