"""What is measured: one function per case that builds the inputs for a size.

A case's builder returns a :class:`Problem`: the library op as a function of the backend, the
plain-PyTorch formula of the same computation (or ``None`` and why), the differentiable inputs,
and the work it does (matmul FLOPs or minimum memory traffic) for each mode.

Work counted (the math, not the algorithm: a kernel's recomputation in backward is not counted):

- InfoNCE-type cases, ``N`` query rows against ``M`` columns of width ``D`` of which ``M_grad``
  get a gradient (the queue gets none): forward ``2*N*M*D`` (the logits); forward + backward adds
  ``2*N*M*D`` for dq and ``2*N*M_grad*D`` for dk, i.e. 3x the forward when every key gets a
  gradient. Elementwise work (softmax, targets) is not counted.
- ``multigrain_pool``: bytes that must cross memory at least once: forward reads the tokens and
  writes every pooled grid; backward reads every pooled gradient and writes the token gradient,
  so forward + backward is twice the forward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

import mgc_kernels as mk

from . import formulas, released_mgc

FWD, FWD_BWD = "fwd", "fwd+bwd"
GRID = 14  # ViT-S/16 at 224 px: a 14 x 14 token grid
DIM = 128  # projection width of the dense heads
TEMPERATURE = 0.1
SOURCE_SIZE = (256, 256)  # (height, width) of the source images the views are cropped from
TRAIN_BATCHES = (32, 64, 128, 256)


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
    released: Callable[[], Any] | None = None  # the released MGC code's approach, if it has one

    def backward(self, out) -> None:
        outputs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outputs, self.out_grads)


@dataclass(frozen=True)
class Case:
    name: str
    op_name: str  # the library op, for backend availability
    build: Callable[..., Problem]  # build(**size, dtype=, device=)
    sizes: tuple[dict, ...]  # the full (GPU) sweep
    quick_sizes: tuple[dict, ...]  # tiny CPU sizes for --quick
    modes: tuple[str, ...] = (FWD, FWD_BWD)


CASES: dict[str, Case] = {}


def case(name: str, *, op_name: str, sizes, quick_sizes, modes=(FWD, FWD_BWD)):
    """Register ``build`` as the case ``name``."""

    def register(build):
        CASES[name] = Case(name, op_name, build, tuple(sizes), tuple(quick_sizes), tuple(modes))
        return build

    return register


# --- inputs ----------------------------------------------------------------------------------


def embeddings(rows: int, dim: int, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=gen).to(device, dtype)


def view_boxes(batch: int, seed: int = 0):
    """``(boxes1, flips1, boxes2, flips2)`` of ``batch`` images: MGC's two overlapping random
    integer crops (:func:`mgc_kernels.transforms.sample_view_boxes`) and random flips, on CPU."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [mk.transforms.sample_view_boxes(*SOURCE_SIZE, generator=gen) for _ in range(batch)]
    flips = torch.rand(2, batch, generator=gen) < 0.5
    boxes1, boxes2 = (torch.stack(views) for views in zip(*pairs))
    return boxes1, flips[0], boxes2, flips[1]


def matmul_flops(rows: int, cols: int, dim: int, grad_cols: int) -> dict[str, float]:
    forward = 2.0 * rows * cols * dim
    return {FWD: forward, FWD_BWD: 2 * forward + 2.0 * rows * grad_cols * dim}


# --- cases -----------------------------------------------------------------------------------


@case("geometric_info_nce", op_name="geometric_info_nce",
      sizes=[{"batch": b} for b in TRAIN_BATCHES], quick_sizes=[{"batch": 2}])
def geometric_info_nce(batch: int, dtype, device, cell: int = 1) -> Problem:
    """Dense MGC at one granularity: every region of view 1 against every region of view 2 in
    the batch, targets from the regions' boxes (metric ``mgc``), N = M = B * (14 / cell)**2."""
    regions = (GRID // cell) ** 2
    rows = batch * regions
    boxes1, flips1, boxes2, flips2 = view_boxes(batch)
    q_regions = mk.region_boxes(boxes1, flips1, GRID, cell).reshape(rows, 4).to(device)
    k_regions = mk.region_boxes(boxes2, flips2, GRID, cell).reshape(rows, 4).to(device)
    image = torch.arange(batch).repeat_interleave(regions).to(device)
    q, k = embeddings(rows, DIM, dtype, device, 1), embeddings(rows, DIM, dtype, device, 2)
    geometry = (q_regions, k_regions, image, image)

    def op(backend):
        return mk.geometric_info_nce(q, k, *geometry, TEMPERATURE, metric="mgc", backend=backend)

    return Problem(
        shapes={"B": batch, "N": rows, "M": rows, "D": DIM, "grid": GRID, "cell": cell,
                "metric": "mgc"},
        op=op, formula=partial(formulas.geometric_info_nce, q, k, *geometry, TEMPERATURE),
        dtype=dtype, grad_inputs=(q, k), flops=matmul_flops(rows, rows, DIM, rows))


@case("info_nce_queue", op_name="info_nce",
      sizes=[{"batch": b, "queue": 65536} for b in TRAIN_BATCHES],
      quick_sizes=[{"batch": 2, "queue": 1024}])
def info_nce_queue(batch: int, queue: int, dtype, device, regions: int = 49) -> Problem:
    """DenseCL-style: N = B * 49 rows, each with one positive key, against the N keys and a
    queue of negatives (no gradient to the queue)."""
    rows = batch * regions
    q, k = embeddings(rows, DIM, dtype, device, 1), embeddings(rows, DIM, dtype, device, 2)
    negatives = embeddings(queue, DIM, dtype, device, 3)
    targets = torch.arange(rows, device=device)

    def op(backend):
        return mk.info_nce(q, k, targets, TEMPERATURE, queue=negatives, backend=backend)

    return Problem(
        shapes={"B": batch, "N": rows, "M": rows, "Q": queue, "D": DIM},
        op=op, formula=partial(formulas.info_nce_queue, q, k, negatives, targets, TEMPERATURE),
        dtype=dtype, grad_inputs=(q, k), flops=matmul_flops(rows, rows + queue, DIM, rows))


@case("multigrain_pool", op_name="multigrain_pool",
      sizes=[{"batch": 256}], quick_sizes=[{"batch": 2}])
def multigrain_pool(batch: int, dtype, device, channels: int = 384,
                    cells=(1, 2, 7, 14)) -> Problem:
    """Average-pool ViT-S tokens [B, 196, 384] at every granularity in one call."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, GRID * GRID, channels, generator=gen).to(device, dtype)
    out_shapes = [(batch, (GRID // c) ** 2, channels) for c in cells]
    out_grads = [torch.randn(s, generator=gen).to(device, dtype) for s in out_shapes]
    element = tokens.element_size()
    traffic = (tokens.numel() + sum(g.numel() for g in out_grads)) * element

    def op(backend):
        return mk.multigrain_pool(tokens, GRID, cells, backend=backend)

    return Problem(
        shapes={"B": batch, "grid": GRID, "C": channels, "cells": list(cells)},
        op=op, formula=partial(formulas.multigrain_pool, tokens, GRID, cells), dtype=dtype,
        grad_inputs=(tokens,), out_grads=out_grads,
        traffic={FWD: float(traffic), FWD_BWD: 2.0 * traffic})


@case("sample_pairs", op_name="sample_pairs", sizes=[{"batch": 1}, {"batch": 256}],
      quick_sizes=[{"batch": 2}], modes=(FWD,))
def sample_pairs(batch: int, dtype, device, cells=(1, 2, 7), ks=(10, 10, 2)) -> Problem:
    """MGC's sparse pairs at three granularities for a batch (boxes are always fp32: they are
    pixel coordinates from the data loader, whatever dtype the network runs in). ``released``:
    the released pipeline's per-sample Python loops, on CPU as in its data workers."""
    boxes = view_boxes(batch)
    views = [t.to(device) for t in boxes]

    def op(backend):
        return [mk.sample_pairs(*views, GRID, cell, k, backend=backend)
                for cell, k in zip(cells, ks)]

    return Problem(
        shapes={"B": batch, "grid": GRID, "cells": list(cells), "k": list(ks)},
        op=op, formula=None, dtype=torch.float32,
        no_formula="no plain-formula baseline (see the released provider)",
        released=partial(released_mgc.sample_pairs_batch, *boxes, GRID, cells))
