"""One whole MGC training step of the reference trainer (``mgc_pretrain``), and its loss alone.

``part=step``: momentum update, online and momentum ViT forwards, multi-grain pooling, pair
sampling, heads, ``MGCLoss``, backward, per-parameter clipping and the AdamW step, under bf16
autocast on a GPU (the trainer's default) and in fp32 on a CPU. ``part=loss``: only the loss
path of that step (pair sampling, ``MGCLoss`` forward and backward) on head outputs of the same
shapes. Their ratio is the loss share of the step (``python -m benchmarks.report``).

Needs the ``train`` extra (timm); without it the case is skipped.
"""

from __future__ import annotations

import torch

import mgc_kernels as mk

from .base import GRID, STEP, Problem, Unavailable, case, randn, view_boxes
from .ops import MGC_CELLS, MGC_PAIRS

# the test-sized ViT of --quick: 56 px, 4 px patches (still a 14 x 14 grid), one block
MICRO = dict(
    timm_name="vit_small_patch16_224",
    img_size=56,
    patch_size=4,
    embed_dim=32,
    depth=1,
    num_heads=2,
    head_hidden=64,
    head_dim=16,
)


def parts(batch: int, arch: str) -> list[dict]:
    return [{"batch": batch, "arch": arch, "part": part} for part in ("step", "loss")]


@case(
    "mgc_train_step",
    op_name="info_nce",
    sizes=parts(64, "vit_s16"),
    cpu_sizes=parts(8, "vit_s16"),
    quick_sizes=parts(2, "micro"),
    modes=(STEP,),
)
def mgc_train_step(batch: int, arch: str, part: str, dtype, device) -> Problem:
    architecture = _arch(arch)
    if part == "loss":
        op = _loss_only(batch, architecture.head_dim, dtype, device)
    else:
        op = _whole_step(batch, architecture, dtype, device)
    return Problem(
        shapes={
            "B": batch,
            "arch": arch,
            "part": part,
            "img": architecture.img_size,
            "grid": GRID,
            "cells": list(MGC_CELLS),
        },
        op=op,
        formula=None,
        dtype=dtype,
        no_formula="a training step (the released loss path is in loss_mgc)",
    )


def _arch(name: str):
    try:
        from mgc_pretrain.models import ARCHS, Arch
    except ImportError as err:
        raise Unavailable(
            f"needs mgc_pretrain's dependencies (pip install -e '.[train]'): {err}"
        ) from err
    return Arch(**MICRO) if name == "micro" else ARCHS[name]


def _views(batch: int, device) -> list[torch.Tensor]:
    return [t.to(device) for t in view_boxes(batch)]


def _whole_step(batch: int, arch, dtype, device):
    from mgc_pretrain.methods import MGC
    from mgc_pretrain.train import clip_per_parameter

    box1, flip1, box2, flip2 = _views(batch, device)
    images = [
        randn(batch, 3, arch.img_size, arch.img_size, dtype=torch.float32, device=device, seed=s)
        for s in (1, 2)
    ]
    inputs = dict(view1=images[0], view2=images[1], box1=box1, flip1=flip1, box2=box2, flip2=flip2)
    autocast = device.type == "cuda" and dtype != torch.float32
    trainers = {}

    def trainer(backend):
        if backend not in trainers:
            torch.manual_seed(0)  # the same weights for every backend
            method = MGC(arch, 0.05, backend=backend).to(device).train()
            params = [p for p in method.parameters() if p.requires_grad]
            trainers[backend] = method, params, torch.optim.AdamW(params, lr=1e-4)
        return trainers[backend]

    def op(backend):
        method, params, optimizer = trainer(backend)
        method.update_momentum(0.996)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss, _ = method(inputs, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_parameter(params, 3.0)
        optimizer.step()

    return op


def _loss_only(batch: int, dim: int, dtype, device):
    views = _views(batch, device)
    q1, q2, k1, k2 = (
        [
            randn(batch, k, dim, dtype=dtype, device=device, seed=10 * s + i)
            for i, k in enumerate(MGC_PAIRS)
        ]
        for s in range(4)
    )
    for q in (*q1, *q2):
        q.requires_grad_(True)
    criteria = {}

    def op(backend):
        if backend not in criteria:
            criteria[backend] = mk.MGCLoss(
                MGC_CELLS, num_pairs=MGC_PAIRS, grid=GRID, backend=backend
            )
        criterion = criteria[backend]
        criterion(q1, q2, k1, k2, criterion.sample_pairs(*views)).backward()
        for q in (*q1, *q2):
            q.grad = None

    return op
