"""The loss modules end to end: one training-mode forward (state updates included) and, in
``fwd+bwd``, the backward into the online features, at ViT-S/16 shapes (a 14 x 14 token grid,
384-wide tokens, 128-wide projections).

Each backend gets its own module, built on its first (untimed) call. No FLOPs are counted: a
module runs several ops whose work the op cases measure one by one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import mgc_kernels as mk

from .. import lightly_baselines, released_mgc
from .base import DIM, GRID, TRAIN_BATCHES, Problem, batches, case, randn, view_boxes
from .ops import HEAD_DIM, MGC_CELLS, MGC_PAIRS, PROTOTYPES, QUEUE, steps

TOKEN_DIM = 384  # ViT-S
QUERIES = 10  # ADCLR query tokens per view
MCL_RATIOS = (1, 2, 7)
SMOG_GROUPS = 3000


def per_backend(make: Callable[[str], nn.Module], device) -> Callable[[str], nn.Module]:
    """``module(backend)``: one training-mode module per backend, built on first use."""
    modules: dict[str, nn.Module] = {}

    def module(backend: str) -> nn.Module:
        if backend not in modules:
            modules[backend] = make(backend).to(device).train()
        return modules[backend]

    return module


def leaves(*shapes, dtype, device, seed: int) -> list[torch.Tensor]:
    return [
        randn(*shape, dtype=dtype, device=device, seed=seed + i) for i, shape in enumerate(shapes)
    ]


@case(
    "loss_mgc",
    op_name="info_nce",
    sizes=batches(*TRAIN_BATCHES, mode="sparse") + batches(*TRAIN_BATCHES, mode="dense"),
    cpu_sizes=batches(32, 256, mode="sparse") + batches(8, mode="dense"),
    quick_sizes=batches(2, mode="sparse") + batches(2, mode="dense"),
)
def loss_mgc(batch: int, mode: str, dtype, device) -> Problem:
    """``MGCLoss`` at cells 1, 2, 7 from the views' boxes: sparse mode samples the pairs
    (K = 10, 10, 2) and contrasts the paired rows, dense mode contrasts every region.
    ``released`` (sparse): its per-sample pair loops on the CPU boxes and its loss on
    materialised logits (the loops run in its data workers; here they are timed in line)."""
    boxes = view_boxes(batch)
    views = [t.to(device) for t in boxes]
    rows = MGC_PAIRS if mode == "sparse" else [(GRID // c) ** 2 for c in MGC_CELLS]
    q1, q2, k1, k2 = (
        [
            randn(batch, r, DIM, dtype=dtype, device=device, seed=10 * s + i)
            for i, r in enumerate(rows)
        ]
        for s in range(4)
    )
    criterion = per_backend(
        lambda backend: mk.MGCLoss(MGC_CELLS, num_pairs=MGC_PAIRS, mode=mode, backend=backend),
        device,
    )

    def op(backend):
        module = criterion(backend)
        if mode == "sparse":
            return module(q1, q2, k1, k2, module.sample_pairs(*views))
        return module(q1, q2, k1, k2, boxes=views)

    baselines = {}
    if mode == "sparse":
        baselines["released"] = steps(
            released_mgc.mgc_loss, q1, q2, k1, k2, *boxes, GRID, MGC_CELLS
        )
    return Problem(
        shapes={"B": batch, "mode": mode, "cells": list(MGC_CELLS), "D": DIM},
        op=op,
        formula=None,
        dtype=dtype,
        grad_inputs=(*q1, *q2),
        no_formula="a module: its ops' formulas are in the op cases",
        baselines=baselines,
    )


@case(
    "loss_densecl",
    op_name="info_nce",
    sizes=batches(*TRAIN_BATCHES, queue=QUEUE),
    cpu_sizes=batches(8, queue=QUEUE),
    quick_sizes=batches(2, queue=1024),
)
def loss_densecl(batch: int, queue: int, dtype, device) -> Problem:
    """``DenseCLLoss``: global and dense InfoNCE against two queues of ``queue`` keys, the dense
    positives by argmax matching of 384-wide backbone tokens, then the enqueue."""
    tokens = GRID * GRID
    q_global, k_global, q_dense, k_dense, f1, f2 = leaves(
        (batch, DIM),
        (batch, DIM),
        (batch, tokens, DIM),
        (batch, tokens, DIM),
        (batch, tokens, TOKEN_DIM),
        (batch, tokens, TOKEN_DIM),
        dtype=dtype,
        device=device,
        seed=0,
    )
    criterion = per_backend(
        lambda backend: mk.DenseCLLoss(DIM, queue_size=queue, backend=backend), device
    )

    def op(backend):
        return criterion(backend)(q_global, k_global, q_dense, k_dense, f1, f2)

    return Problem(
        shapes={"B": batch, "S": tokens, "Q": queue, "D": DIM, "C": TOKEN_DIM},
        op=op,
        formula=None,
        dtype=dtype,
        grad_inputs=(q_global, q_dense),
        no_formula="a module: its ops' formulas are in the op cases",
    )


@case(
    "loss_smog",
    op_name="info_nce",
    sizes=batches(*TRAIN_BATCHES, groups=SMOG_GROUPS),
    cpu_sizes=batches(64, 256, groups=SMOG_GROUPS),
    quick_sizes=batches(2, groups=64),
)
def loss_smog(batch: int, groups: int, dtype, device) -> Problem:
    """``SMoGLoss`` one direction (``symmetric=False``, as lightly's example alternates views):
    assign by the momentum features, update the groups, InfoNCE against them, push the bank.
    The k-means reset (every 300 steps) is left out of the per-step time. ``lightly``:
    ``SMoGPrototypes`` with the same groups and a cross-entropy on its logits."""
    p1, z2 = leaves((batch, DIM), (batch, DIM), dtype=dtype, device=device, seed=0)

    def make(backend):
        return mk.SMoGLoss(DIM, num_groups=groups, reset_every=0, symmetric=False, backend=backend)

    criterion = per_backend(make, device)
    initial_groups = make("torch").group_features.to(device, dtype)

    def op(backend):
        return criterion(backend)(p1, z2)

    return Problem(
        shapes={"B": batch, "K": groups, "D": DIM},
        op=op,
        formula=None,
        dtype=dtype,
        grad_inputs=(p1,),
        no_formula="a module: its ops' formulas are in the op cases",
        baselines={"lightly": lambda: lightly_baselines.smog(p1, z2, initial_groups, 0.99, 0.1)},
    )


@case(
    "loss_adclr",
    op_name="linear_soft_ce",
    sizes=batches(*TRAIN_BATCHES, prototypes=PROTOTYPES),
    cpu_sizes=batches(8, prototypes=PROTOTYPES),
    quick_sizes=batches(2, prototypes=1024),
)
def loss_adclr(batch: int, prototypes: int, dtype, device) -> Problem:
    """``ADCLRLoss``: CLS and 10 query tokens per global view through the student and teacher
    prototype layers [K, 256], the soft-target cross-entropies and the centre updates."""
    student_cls, teacher_cls, student_query, teacher_query, student_weight, teacher_weight = leaves(
        (2, batch, HEAD_DIM),
        (2, batch, HEAD_DIM),
        (2, batch, QUERIES, HEAD_DIM),
        (2, batch, QUERIES, HEAD_DIM),
        (prototypes, HEAD_DIM),
        (prototypes, HEAD_DIM),
        dtype=dtype,
        device=device,
        seed=0,
    )
    criterion = per_backend(lambda backend: mk.ADCLRLoss(prototypes, backend=backend), device)

    def op(backend):
        return criterion(backend)(
            student_cls,
            teacher_cls,
            student_query,
            teacher_query,
            student_weight,
            teacher_weight,
            epoch=0,
        )

    return Problem(
        shapes={"B": batch, "Q": QUERIES, "D": HEAD_DIM, "K": prototypes},
        op=op,
        formula=None,
        dtype=dtype,
        grad_inputs=(student_cls, student_query, student_weight),
        no_formula="a module: its ops' formulas are in the op cases",
    )


@case(
    "loss_mcl",
    op_name="info_nce",
    sizes=batches(*TRAIN_BATCHES),
    cpu_sizes=batches(32, 256),
    quick_sizes=batches(2),
)
def loss_mcl(batch: int, dtype, device) -> Problem:
    """``MCLLoss`` at montage ratios 1, 2, 7 and its released defaults: every sub-image of
    ``ceil(B / r**2)`` montages per level (montage's default count, each image at least once)
    against the momentum embeddings of the plain views of the batch, both directions."""
    slots = [r * r for r in MCL_RATIOS]
    montages = [-(-batch // s) for s in slots]
    q1, q2 = (
        [
            randn(m, s, DIM, dtype=dtype, device=device, seed=10 * v + i)
            for i, (m, s) in enumerate(zip(montages, slots))
        ]
        for v in range(2)
    )
    k1, k2 = leaves((batch, DIM), (batch, DIM), dtype=dtype, device=device, seed=50)
    gen = torch.Generator().manual_seed(0)
    sources1, sources2 = (
        [torch.randint(batch, (m, s), generator=gen).to(device) for m, s in zip(montages, slots)]
        for _ in range(2)
    )
    criterion = per_backend(lambda backend: mk.MCLLoss(MCL_RATIOS, backend=backend), device)

    def op(backend):
        return criterion(backend)(q1, q2, k1, k2, sources1, sources2)

    return Problem(
        shapes={"B": batch, "ratios": list(MCL_RATIOS), "M": montages, "D": DIM},
        op=op,
        formula=None,
        dtype=dtype,
        grad_inputs=(*q1, *q2),
        no_formula="a module: its ops' formulas are in the op cases",
    )
