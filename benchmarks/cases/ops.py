"""The op cases: each public op of the library at the sizes people train at.

Work counted: InfoNCE-type cases see :func:`.base.matmul_flops`; ``multigrain_pool`` counts the
bytes that must cross memory at least once (forward reads the tokens and writes every pooled
grid; backward reads every pooled gradient and writes the token gradient, so forward + backward
is twice the forward); the geometry cases count none.
"""

from __future__ import annotations

from functools import partial

import torch

import mgc_kernels as mk

from .. import attention_baseline, formulas, lightly_baselines, released_mgc
from .base import (
    DIM,
    FWD,
    FWD_BWD,
    GRID,
    TEMPERATURE,
    TRAIN_BATCHES,
    Problem,
    batches,
    case,
    embeddings,
    matmul_flops,
    randn,
    view_boxes,
)

MGC_CELLS, MGC_PAIRS = (1, 2, 7), (10, 10, 2)
QUEUE = 65536
PROTOTYPES = 65536  # ADCLR's (DINO's) K_out
HEAD_DIM = 256  # DINO head bottleneck width, the input of its last (prototype) layer
TOKENS_PER_VIEW = 11  # ADCLR: the CLS token and 10 query tokens, per global view


def steps(fn, *args):
    """A baseline that needs no set-up: its maker returns ``fn(*args)`` as the step."""
    return lambda: partial(fn, *args)


@case(
    "correspondence",
    op_name="correspondence",
    sizes=batches(1, 256),
    cpu_sizes=batches(1, 256),
    quick_sizes=batches(2),
    modes=(FWD,),
)
def correspondence(batch: int, dtype, device) -> Problem:
    """The dense ``[B, n, n]`` MGC weight matrices of a batch at three granularities (boxes are
    fp32 pixel coordinates whatever dtype the network runs in)."""
    views = [t.to(device) for t in view_boxes(batch)]

    def op(backend):
        return [mk.correspondence(*views, GRID, cell, backend=backend) for cell in MGC_CELLS]

    return Problem(
        shapes={"B": batch, "grid": GRID, "cells": list(MGC_CELLS), "metric": "mgc"},
        op=op,
        formula=None,
        dtype=torch.float32,
        no_formula="the torch provider is the plain-PyTorch formula of this op",
    )


@case(
    "sample_pairs",
    op_name="sample_pairs",
    sizes=batches(1, 256),
    cpu_sizes=batches(1, 256),
    quick_sizes=batches(2),
    modes=(FWD,),
)
def sample_pairs(batch: int, dtype, device) -> Problem:
    """MGC's sparse pairs at three granularities for a batch. ``released``: the released
    pipeline's per-sample Python loops, on CPU as in its data workers."""
    boxes = view_boxes(batch)
    views = [t.to(device) for t in boxes]

    def op(backend):
        return [
            mk.sample_pairs(*views, GRID, cell, k, backend=backend)
            for cell, k in zip(MGC_CELLS, MGC_PAIRS)
        ]

    return Problem(
        shapes={"B": batch, "grid": GRID, "cells": list(MGC_CELLS), "k": list(MGC_PAIRS)},
        op=op,
        formula=None,
        dtype=torch.float32,
        no_formula="no plain-formula baseline (see the released provider)",
        baselines={"released": steps(released_mgc.sample_pairs_batch, *boxes, GRID, MGC_CELLS)},
    )


@case(
    "multigrain_pool",
    op_name="multigrain_pool",
    sizes=batches(*TRAIN_BATCHES),
    cpu_sizes=batches(64, 256),
    quick_sizes=batches(2),
)
def multigrain_pool(batch: int, dtype, device, channels: int = 384, cells=(1, 2, 7, 14)) -> Problem:
    """Average-pool ViT-S tokens [B, 196, 384] at every granularity in one call."""
    tokens = randn(batch, GRID * GRID, channels, dtype=dtype, device=device, seed=0)
    out_grads = [
        randn(batch, (GRID // c) ** 2, channels, dtype=dtype, device=device, seed=c) for c in cells
    ]
    traffic = (tokens.numel() + sum(g.numel() for g in out_grads)) * tokens.element_size()

    def op(backend):
        return mk.multigrain_pool(tokens, GRID, cells, backend=backend)

    return Problem(
        shapes={"B": batch, "grid": GRID, "C": channels, "cells": list(cells)},
        op=op,
        formula=partial(formulas.multigrain_pool, tokens, GRID, cells),
        dtype=dtype,
        grad_inputs=(tokens,),
        out_grads=out_grads,
        traffic={FWD: float(traffic), FWD_BWD: 2.0 * traffic},
    )


@case(
    "info_nce_sparse",
    op_name="info_nce",
    sizes=batches(*TRAIN_BATCHES),
    cpu_sizes=batches(*TRAIN_BATCHES),
    quick_sizes=batches(2),
)
def info_nce_sparse(batch: int, dtype, device, pairs: int = 10) -> Problem:
    """MGC's sparse loss at cell 1, one direction: the ``B * 10`` sampled view-1 regions
    against the ``B * 10`` paired view-2 keys (each row's own pair is its positive), rows
    weighted by their overlap. ``released``: the released loss, materialised logits and a
    mean cross-entropy times the weights over their sum."""
    rows = batch * pairs
    q, k = embeddings(rows, DIM, dtype, device, 1), embeddings(rows, DIM, dtype, device, 2)
    weights = 0.5 * torch.rand(rows, generator=torch.Generator().manual_seed(3)).to(device)
    targets = torch.arange(rows, device=device)

    def op(backend):
        return mk.info_nce(q, k, targets, TEMPERATURE, row_weights=weights, backend=backend)

    return Problem(
        shapes={"B": batch, "N": rows, "M": rows, "D": DIM},
        op=op,
        formula=partial(formulas.info_nce, q, k, targets, TEMPERATURE, weights),
        dtype=dtype,
        grad_inputs=(q, k),
        flops=matmul_flops(rows, rows, DIM, rows),
        baselines={"released": steps(released_mgc.contrastive_loss, q, k, weights, TEMPERATURE)},
    )


@case(
    "geometric_info_nce",
    op_name="geometric_info_nce",
    sizes=[{"batch": b, "cell": c} for c in MGC_CELLS for b in TRAIN_BATCHES],
    cpu_sizes=[
        {"batch": b, "cell": c}
        for c, sizes in ((1, (8, 32)), (2, (32, 128)), (7, (32, 256)))
        for b in sizes
    ],
    quick_sizes=[{"batch": 2, "cell": 1}],
)
def geometric_info_nce(batch: int, cell: int, dtype, device) -> Problem:
    """Dense MGC at one granularity: every region of view 1 against every region of view 2 in
    the batch, targets from the regions' boxes (metric ``mgc``), N = M = B * (14 / cell)**2.
    ``lightly``: DetConB's loss on the same regions (mask = region index), which contrasts both
    directions against both views: 4x the logits of one direction here. ``torch_attention``:
    the same loss and gradients from PyTorch's fused attention kernels."""
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
        shapes={
            "B": batch,
            "N": rows,
            "M": rows,
            "D": DIM,
            "grid": GRID,
            "cell": cell,
            "metric": "mgc",
        },
        op=op,
        formula=partial(formulas.geometric_info_nce, q, k, *geometry, TEMPERATURE),
        dtype=dtype,
        grad_inputs=(q, k),
        flops=matmul_flops(rows, rows, DIM, rows),
        baselines={
            "lightly": partial(lightly_baselines.detconb, q, k, batch, regions, TEMPERATURE),
            "torch_attention": partial(
                attention_baseline.geometric_step, q, k, q_regions, k_regions, batch, TEMPERATURE
            ),
        },
        flops_scale={"lightly": 4.0},
    )


@case(
    "info_nce_queue",
    op_name="info_nce",
    sizes=batches(*TRAIN_BATCHES, queue=QUEUE),
    cpu_sizes=batches(8, 32, queue=QUEUE),
    quick_sizes=batches(2, queue=1024),
)
def info_nce_queue(batch: int, queue: int, dtype, device, regions: int = 49) -> Problem:
    """DenseCL-style: N = B * 49 rows, each with one positive key, against the N keys and a
    queue of negatives (no gradient to the queue). ``lightly``: ``NTXentLoss`` with a memory
    bank of the same size (MoCo-style: the positive and the bank, no in-batch negatives).
    ``torch_attention``: the same loss and gradients from PyTorch's fused attention kernels."""
    rows = batch * regions
    q, k = embeddings(rows, DIM, dtype, device, 1), embeddings(rows, DIM, dtype, device, 2)
    negatives = embeddings(queue, DIM, dtype, device, 3)
    targets = torch.arange(rows, device=device)

    def op(backend):
        return mk.info_nce(q, k, targets, TEMPERATURE, queue=negatives, backend=backend)

    flops = matmul_flops(rows, rows + queue, DIM, rows)
    lightly_forward = 2.0 * rows * (1 + queue) * DIM
    return Problem(
        shapes={"B": batch, "N": rows, "M": rows, "Q": queue, "D": DIM},
        op=op,
        formula=partial(formulas.info_nce_queue, q, k, negatives, targets, TEMPERATURE),
        dtype=dtype,
        grad_inputs=(q, k),
        flops=flops,
        baselines={
            "lightly": partial(lightly_baselines.ntxent_queue, q, k, negatives, TEMPERATURE),
            "torch_attention": partial(attention_baseline.queue_step, q, k, negatives, TEMPERATURE),
        },
        flops_scale={"lightly": lightly_forward / flops[FWD]},
    )


@case(
    "linear_soft_ce",
    op_name="linear_soft_ce",
    sizes=batches(*TRAIN_BATCHES, prototypes=PROTOTYPES),
    cpu_sizes=batches(8, 32, prototypes=PROTOTYPES),
    quick_sizes=batches(2, prototypes=1024),
)
def linear_soft_ce(batch: int, prototypes: int, dtype, device) -> Problem:
    """ADCLR's head loss: N = 2 views * B * 11 tokens rows (5632 at B = 256) of width 256
    through student and teacher prototype layers [K, 256] into a soft-target cross-entropy.
    ``lightly``: the two linear layers, then ``DINOLoss`` on the logits."""
    rows = 2 * batch * TOKENS_PER_VIEW
    student = embeddings(rows, HEAD_DIM, dtype, device, 1)
    teacher = embeddings(rows, HEAD_DIM, dtype, device, 2)
    student_weight = embeddings(prototypes, HEAD_DIM, dtype, device, 3) * HEAD_DIM**-0.5
    teacher_weight = embeddings(prototypes, HEAD_DIM, dtype, device, 4) * HEAD_DIM**-0.5
    center = 0.1 * embeddings(1, prototypes, torch.float32, device, 5)[0]
    inputs = (student, student_weight, teacher, teacher_weight, center, TEMPERATURE, 0.07)

    def op(backend):
        loss, _teacher_mean = mk.linear_soft_ce(
            student,
            student_weight,
            teacher,
            teacher_weight,
            center=center,
            student_temperature=TEMPERATURE,
            teacher_temperature=0.07,
            backend=backend,
        )
        return loss

    logits = 2.0 * rows * prototypes * HEAD_DIM  # one of the two (student, teacher) products
    return Problem(
        shapes={"B": batch, "N": rows, "D": HEAD_DIM, "K": prototypes},
        op=op,
        formula=partial(formulas.linear_soft_ce, *inputs),
        dtype=dtype,
        grad_inputs=(student, student_weight),
        flops={FWD: 2 * logits, FWD_BWD: 4 * logits},
        baselines={"lightly": partial(lightly_baselines.dino, *inputs)},
    )
