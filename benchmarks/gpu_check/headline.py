"""Phase c: the headline correctness checks at full size, against the reference in the same dtype.

Each check runs a fast backend through the public op (forward and backward) and compares it with
the torch backend in the same dtype and in fp64 by the rule of :mod:`.rule`; the geometry checks
compare with the CPU reference bit for bit. A check yields one record per fast backend: the worst
excess over the rule per output (<= 0 passes) or the number of differing entries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

import mgc_kernels as mk

from .. import results
from ..cases.base import view_boxes
from .rule import excess, grad_tol, output_tol, pool_tol, representable, unit_rows

GRID, DIM, HEAD_DIM = 14, 128, 256
# the sizes of the performance targets; --dry-run's, for Triton's interpreter on a CPU
FULL = {"batch": 256, "queue": 65536, "prototypes": 65536, "cells": ((1, 10), (2, 10), (7, 2))}
TINY = {"batch": 1, "queue": 1024, "prototypes": 256, "cells": ((7, 2),)}


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _run(op, backend, dtype, inputs: dict, upstream: torch.Tensor):
    """``(rows, *gradients)`` of ``op(backend, **leaves)`` (per-row outputs, summed against
    ``upstream``) for leaves cast to ``dtype``."""
    leaves = {n: x.detach().to(dtype).clone().requires_grad_(True) for n, x in inputs.items()}
    rows = op(backend, **leaves)
    rows.backward(upstream.to(rows.dtype))
    return (rows.detach(), *(leaf.grad for leaf in leaves.values()))


def _rule(op, backend, dtype, inputs, upstream, names, output_scale=1.0) -> dict:
    fast = _run(op, backend, dtype, inputs, upstream)
    ref = _run(op, "torch", dtype, inputs, upstream)
    exact = _run(op, "torch", torch.float64, inputs, upstream)
    tols = [output_tol(exact[0], output_scale)] + [grad_tol(e, dtype) for e in exact[1:]]
    return {name: excess(*values, tol) for name, *values, tol in zip(names, fast, ref, exact, tols)}


def geometric_info_nce(device, dtype, size, backend) -> dict:
    """Dense MGC at cell 1: N = M = B * 196 rows of width 128, targets from the region boxes."""
    batch = size["batch"]
    rows = batch * GRID * GRID
    gen = torch.Generator().manual_seed(0)
    boxes1, flips1, boxes2, flips2 = view_boxes(batch)
    regions = [
        mk.region_boxes(b, f, GRID, 1).reshape(rows, 4).to(device)
        for b, f in ((boxes1, flips1), (boxes2, flips2))
    ]
    image = torch.arange(batch, device=device).repeat_interleave(GRID * GRID)
    inputs = {"q": unit_rows(gen, rows, DIM).to(device), "k": unit_rows(gen, rows, DIM).to(device)}
    upstream = (0.5 + torch.rand(rows, generator=gen)).to(device)

    def op(backend, q, k):
        return mk.geometric_info_nce(
            q, k, *regions, image, image, 0.1, normalize=False, reduction="none", backend=backend
        )

    return _rule(op, backend, dtype, inputs, upstream, ("rows", "dq", "dk"))


def info_nce_queue(device, dtype, size, backend) -> dict:
    """DenseCL's dense loss: N = B * 49 rows, each with its own key, and a queue of negatives."""
    rows = size["batch"] * 49
    gen = torch.Generator().manual_seed(1)
    inputs = {"q": unit_rows(gen, rows, DIM).to(device), "k": unit_rows(gen, rows, DIM).to(device)}
    queue = unit_rows(gen, size["queue"], DIM).to(device)
    targets = torch.arange(rows, device=device)
    upstream = (0.5 + torch.rand(rows, generator=gen)).to(device)

    def op(backend, q, k):
        return mk.info_nce(
            q,
            k,
            targets,
            0.2,
            queue=queue.to(q.dtype),
            normalize=False,
            reduction="none",
            backend=backend,
        )

    return _rule(op, backend, dtype, inputs, upstream, ("rows", "dq", "dk"))


def linear_soft_ce(device, dtype, size, backend) -> dict:
    """ADCLR's head: N = 2 * B * 11 rows of width 256 against K prototypes (weight-normalised,
    so logits stay within 1 / tau), teacher given by its features and prototypes."""
    rows, k = 2 * size["batch"] * 11, size["prototypes"]
    gen = torch.Generator().manual_seed(2)
    inputs = {
        "x": unit_rows(gen, rows, HEAD_DIM).to(device),
        "w": unit_rows(gen, k, HEAD_DIM).to(device),
    }
    teacher = [unit_rows(gen, n, HEAD_DIM).to(device) for n in (rows, k)]
    center = representable(0.1 * torch.randn(k, generator=gen)).to(device)
    upstream = torch.full((rows,), 1.0 / rows, device=device)

    def op(backend, x, w):
        loss, _ = mk.linear_soft_ce(
            x,
            w,
            *(t.to(x.dtype) for t in teacher),
            center=center,
            reduction="none",
            backend=backend,
        )
        return loss

    # logits reach 1 / tau_t = 25: the fp32 tolerance of the tests/gpu ADCLR check
    return _rule(op, backend, dtype, inputs, upstream, ("rows", "dx", "dw"), output_scale=32.0)


def multigrain_pool(device, dtype, size, backend) -> dict:
    """ViT-S tokens [B, 196, 384] pooled at cells 1, 2, 7, 14, forward and backward."""
    gen = torch.Generator().manual_seed(3)
    cells = (1, 2, 7, 14)
    tokens = (torch.rand(size["batch"], GRID * GRID, 384, generator=gen) - 0.5).to(device)
    upstream = [
        torch.randn(size["batch"], (GRID // c) ** 2, 384, generator=gen).to(device) for c in cells
    ]

    def run(backend, dtype):
        x = tokens.to(dtype).clone().requires_grad_(True)
        outs = mk.multigrain_pool(x, GRID, cells, backend=backend)
        torch.autograd.backward(outs, [g.to(dtype) for g in upstream])
        return [o.detach() for o in outs] + [x.grad]

    fast, ref, exact = run(backend, dtype), run("torch", dtype), run("torch", torch.float64)
    names = [f"cell{c}" for c in cells] + ["dtokens"]
    return {n: excess(f, r, e, pool_tol(e, dtype)) for n, f, r, e in zip(names, fast, ref, exact)}


def geometry(device, dtype, size, backend) -> dict:
    """``sample_pairs`` (MGC's cells and pairs per image; the released rule) and
    ``correspondence`` of a batch on the device against the CPU reference: the number of
    differing entries (0 passes)."""
    cpu_views = view_boxes(size["batch"], seed=4)
    views = [t.to(device) for t in cpu_views]
    differing = {}
    for cell, k in size["cells"]:
        got = mk.sample_pairs(*views, GRID, cell, k, backend=backend)
        want = mk.sample_pairs(*cpu_views, GRID, cell, k, backend="torch")
        differing[f"pairs c={cell}"] = sum(int((g.cpu() != w).sum()) for g, w in zip(got, want))
        got = mk.correspondence(*views, GRID, cell, backend=backend).cpu()
        want = mk.correspondence(*cpu_views, GRID, cell, backend="torch")
        differing[f"weights c={cell}"] = int((got != want).sum())
    return differing


CHECKS = (  # (check, op, fast backends), the most important first
    (geometric_info_nce, "geometric_info_nce", ("triton",)),
    (info_nce_queue, "info_nce", ("triton",)),
    (linear_soft_ce, "linear_soft_ce", ("triton",)),
    (multigrain_pool, "multigrain_pool", ("triton", "native")),
    (geometry, "sample_pairs", ("triton", "native")),
)


def run(device: torch.device, dtype: torch.dtype, size: dict, deadline: float) -> Iterator[dict]:
    """One record per (check, fast backend), until ``deadline`` (time.time())."""
    for check, op, fast_backends in CHECKS:
        for backend in fast_backends:
            record = {
                "check": check.__name__,
                "backend": backend,
                "dtype": results.dtype_name(dtype),
                "batch": size["batch"],
            }
            if time.time() > deadline:
                yield {**record, "status": "not run: the phase's time is up"}
                continue
            start = time.perf_counter()
            try:
                mk.backends.resolve(op, backend, device, dtype)
                values = check(device, dtype, size, backend)
                status = "ok" if all(v <= 0 for v in values.values()) else "FAIL"
            except Exception as err:  # a record, whatever went wrong
                values, status = {}, f"error: {first_line(err)}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            yield {
                **record,
                "values": values,
                "status": status,
                "seconds": round(time.perf_counter() - start, 2),
            }
