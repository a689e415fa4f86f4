"""What a case is: a builder of inputs per size, and what runs on them.

A case's builder returns a :class:`Problem`: the library op as a function of the backend, the
plain-PyTorch formula of the same computation (or ``None`` and why), other projects' ways of
computing it (``baselines``: the released MGC code's approach, lightly's loss), the
differentiable inputs, and the work it does (matmul FLOPs or minimum memory traffic) per mode.
A builder raises :class:`Unavailable` when the case cannot run here at all (a missing optional
package); every provider then reports the reason as a skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import mgc_kernels as mk

FWD, FWD_BWD = "fwd", "fwd+bwd"
STEP = "step"  # the op is a whole training step: its own backward and optimiser update
GRID = 14  # ViT-S/16 at 224 px: a 14 x 14 token grid
DIM = 128  # projection width of the dense heads
TEMPERATURE = 0.1
SOURCE_SIZE = (256, 256)  # (height, width) of the source images the views are cropped from
TRAIN_BATCHES = (32, 64, 128, 256)


class Unavailable(RuntimeError):
    """The case cannot be built here (its message says why)."""


@dataclass
class Problem:
    """Inputs of one case at one size, and what runs on them."""

    shapes: dict[str, Any]
    op: Callable[[str], Any]  # the library op, given the backend name
    formula: Callable[[], Any] | None  # plain PyTorch baseline, or None
    dtype: torch.dtype  # dtype of the floating-point inputs as run
    grad_inputs: tuple[torch.Tensor, ...] = ()  # leaves that get gradients in fwd+bwd
    out_grads: list[torch.Tensor] | None = None  # upstream gradients (None: scalar output)
    flops: dict[str, float] | None = None  # per mode
    traffic: dict[str, float] | None = None  # bytes per mode
    no_formula: str = "no plain-PyTorch formula for this case"
    # other projects' implementations by provider name ("released", "lightly")
    baselines: dict[str, Callable[[], Any]] = field(default_factory=dict)
    # a baseline's matmul work as a multiple of ``flops`` where its algorithm does more or less
    flops_scale: dict[str, float] = field(default_factory=dict)

    def backward(self, out) -> None:
        outputs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outputs, self.out_grads)

    def work(self, provider: str, mode: str) -> tuple[float | None, float | None]:
        """``(flops, traffic)`` of ``provider`` in ``mode``."""
        flops = (self.flops or {}).get(mode)
        if flops is not None:
            flops *= self.flops_scale.get(provider, 1.0)
        return flops, (self.traffic or {}).get(mode)


@dataclass(frozen=True)
class Case:
    name: str
    op_name: str  # the library op, for backend availability
    build: Callable[..., Problem]  # build(**size, dtype=, device=)
    sizes: tuple[dict, ...]  # the full sweep on a GPU
    cpu_sizes: tuple[dict, ...]  # the full sweep on a CPU (what a few cores do in minutes)
    quick_sizes: tuple[dict, ...]  # tiny CPU sizes for --quick
    modes: tuple[str, ...] = (FWD, FWD_BWD)

    def sweep(self, device: torch.device, quick: bool) -> tuple[dict, ...]:
        if quick:
            return self.quick_sizes
        return self.sizes if device.type == "cuda" else self.cpu_sizes


def variant(size: dict) -> str:
    """What distinguishes sizes of one case besides the batch: ``"cell=2"``, or ``""``."""
    return ",".join(f"{key}={value}" for key, value in size.items() if key != "batch")


CASES: dict[str, Case] = {}


def case(name: str, *, op_name: str, sizes, cpu_sizes, quick_sizes, modes=(FWD, FWD_BWD)):
    """Register ``build`` as the case ``name``."""

    def register(build):
        CASES[name] = Case(
            name, op_name, build, tuple(sizes), tuple(cpu_sizes), tuple(quick_sizes), tuple(modes)
        )
        return build

    return register


def batches(*sizes: int, **fixed) -> list[dict]:
    """``[{"batch": b, **fixed} for b in sizes]``."""
    return [{"batch": b, **fixed} for b in sizes]


# --- inputs ----------------------------------------------------------------------------------


def randn(*shape: int, dtype, device, seed: int) -> torch.Tensor:
    """Standard-normal values drawn on the CPU (the same numbers on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype)


def embeddings(rows: int, dim: int, dtype, device, seed: int) -> torch.Tensor:
    return randn(rows, dim, dtype=dtype, device=device, seed=seed)


def view_boxes(batch: int, seed: int = 0):
    """``(boxes1, flips1, boxes2, flips2)`` of ``batch`` images: MGC's two overlapping random
    integer crops (:func:`mgc_kernels.transforms.sample_view_boxes`) and random flips, on CPU."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [mk.transforms.sample_view_boxes(*SOURCE_SIZE, generator=gen) for _ in range(batch)]
    flips = torch.rand(2, batch, generator=gen) < 0.5
    boxes1, boxes2 = (torch.stack(views) for views in zip(*pairs))
    return boxes1, flips[0], boxes2, flips[1]


def matmul_flops(rows: int, cols: int, dim: int, grad_cols: int) -> dict[str, float]:
    """InfoNCE-type work: ``rows`` queries against ``cols`` keys of width ``dim``, of which
    ``grad_cols`` get a gradient: forward ``2*N*M*D`` (the logits); backward ``2*N*M*D`` for
    dq and ``2*N*M_grad*D`` for dk. Elementwise work (softmax, targets) is not counted, nor a
    kernel's recomputation in backward (the math, not the algorithm)."""
    forward = 2.0 * rows * cols * dim
    return {FWD: forward, FWD_BWD: 2 * forward + 2.0 * rows * grad_cols * dim}
