"""Phase b: every public op on every backend in fp32, bf16 and fp16 at a tiny size, forward and
backward, against the torch reference on CPU.

A smoke test, not the precision test (phase c and ``tests/gpu`` are): geometry must equal the CPU
reference in the same dtype, losses and gradients must be finite and within a loose relative
error of the fp64 reference. Each (op, backend, dtype) gives one row: ``ok``, ``n/a`` (the backend
has no such op), ``unavailable: ...``, ``skipped: ...`` or ``FAIL: <first line of the error>``.
"""

from __future__ import annotations

import torch

import mgc_kernels as mk

from ..cases.base import view_boxes
from .rule import representable, unit_rows

OPS = (
    "region_boxes",
    "correspondence",
    "sample_pairs",
    "multigrain_pool",
    "info_nce",
    "geometric_info_nce",
    "linear_soft_ce",
)
BACKENDS = ("triton", "native", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GEOMETRY = {"region_boxes", "correspondence", "sample_pairs"}
# Triton's interpreter runs no bf16 dots and rounds fp32 to bf16 by truncation
INTERPRETER_NO_BF16 = {
    "sample_pairs",
    "multigrain_pool",
    "info_nce",
    "geometric_info_nce",
    "linear_soft_ce",
}
# loose: a wrong kernel is off by O(1); a right one by a few roundings of its dtype
RELATIVE_ERROR = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
GRID = 14


def _views(dtype, device):
    return [
        t.to(device, dtype) if t.is_floating_point() else t.to(device)
        for t in view_boxes(2, seed=1)
    ]


def _with_grads(run, inputs: dict, upstream: dict):
    """``run(**leaves)`` -> dict of outputs; adds the gradients of ``sum(out * upstream)``
    with respect to each leaf as ``d<name>``."""
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in inputs.items()}
    outs = run(**leaves)
    used = [n for n in upstream if n in outs]
    torch.autograd.backward(
        [outs[n] for n in used], [upstream[n].to(outs[n].device, outs[n].dtype) for n in used]
    )
    return {
        **{n: o.detach() for n, o in outs.items()},
        **{f"d{n}": leaf.grad for n, leaf in leaves.items() if leaf.grad is not None},
    }


def _inputs(op: str) -> tuple[dict, dict]:
    """fp32 CPU inputs of a loss op, exact in every dtype, and the upstream gradients."""
    gen = torch.Generator().manual_seed(OPS.index(op))
    if op == "multigrain_pool":
        tokens = representable(torch.rand(2, GRID * GRID, 64, generator=gen) - 0.5)
        return {"tokens": tokens}, {
            f"cell{c}": torch.randn(2, (GRID // c) ** 2, 64, generator=gen) for c in (1, 2, 7, 14)
        }
    if op == "linear_soft_ce":
        x, w, y, v = (unit_rows(gen, n, 256) for n in (32, 512, 32, 512))
        return {"x": x, "w": w, "y": y, "v": v}, {"rows": torch.rand(32, generator=gen)}
    rows = 2 * (GRID // 2) ** 2 if op == "geometric_info_nce" else 64
    q, k, queue = unit_rows(gen, rows), unit_rows(gen, rows), unit_rows(gen, 128)
    inputs = {"q": q, "k": k} if op == "geometric_info_nce" else {"q": q, "k": k, "queue": queue}
    return inputs, {"rows": torch.rand(rows, generator=gen)}


def _geometry(op, backend, dtype, device) -> dict:
    views = _views(dtype, device)
    if op == "region_boxes":
        return {"regions": mk.region_boxes(views[0], views[1], GRID, 2, backend=backend)}
    if op == "correspondence":
        return {"weights": mk.correspondence(*views, GRID, 2, backend=backend)}
    return mk.sample_pairs(*views, GRID, 2, 4, backend=backend)._asdict()


def _loss(op, backend, dtype, device) -> dict:
    inputs, upstream = _inputs(op)
    inputs = {n: x.to(device, dtype) for n, x in inputs.items()}
    center = torch.linspace(-0.1, 0.1, 512).to(device, torch.promote_types(dtype, torch.float32))
    targets = (torch.arange(64, device=device)[:, None] + torch.tensor([0, 7], device=device)) % 64
    soft = torch.tensor([[0.75, 0.25]], device=device).expand(64, 2)
    views = [t.to(device) for t in view_boxes(2, seed=1)]
    regions = [mk.region_boxes(b, f, GRID, 2).reshape(-1, 4) for b, f in (views[:2], views[2:])]
    image = torch.arange(2, device=device).repeat_interleave((GRID // 2) ** 2)

    def run(**x):
        if op == "multigrain_pool":
            outs = mk.multigrain_pool(x["tokens"], GRID, (1, 2, 7, 14), backend=backend)
            return {f"cell{c}": o for c, o in zip((1, 2, 7, 14), outs)}
        if op == "info_nce":
            return {
                "rows": mk.info_nce(
                    x["q"],
                    x["k"],
                    (targets, soft),
                    0.1,
                    queue=x["queue"],
                    normalize=False,
                    reduction="none",
                    backend=backend,
                )
            }
        if op == "geometric_info_nce":
            return {
                "rows": mk.geometric_info_nce(
                    x["q"],
                    x["k"],
                    *regions,
                    image,
                    image,
                    0.1,
                    normalize=False,
                    reduction="none",
                    backend=backend,
                )
            }
        rows, mean = mk.linear_soft_ce(
            x["x"], x["w"], x["y"], x["v"], center=center, reduction="none", backend=backend
        )
        return {"rows": rows, "teacher_mean": mean}

    return _with_grads(run, inputs, upstream)


def outputs(op: str, backend: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Named outputs and gradients of ``op`` on ``backend``."""
    fn = _geometry if op in GEOMETRY else _loss
    return fn(op, backend, dtype, device)


def compare(op: str, got: dict, dtype: torch.dtype) -> None:
    """Raise AssertionError naming the first output that is off."""
    cpu = torch.device("cpu")
    want = outputs(op, "torch", dtype if op in GEOMETRY else torch.float64, cpu)
    for name, expected in want.items():
        value = got[name].cpu()
        assert value.shape == expected.shape, f"{name}: shape {tuple(value.shape)}"
        if not value.is_floating_point():
            assert torch.equal(value, expected), f"{name}: differs from the reference"
            continue
        value, expected = value.double(), expected.double()
        assert value.isfinite().all(), f"{name}: not finite"
        limit = 4 * torch.finfo(dtype).eps if op in GEOMETRY else RELATIVE_ERROR[dtype]
        error = (value - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
        assert error <= limit, f"{name}: relative error {error:.2e} > {limit:.0e}"


def status(op: str, backend: str, dtype: torch.dtype, device: torch.device) -> str:
    try:
        mk.backends.resolve(op, backend, device, dtype)
    except RuntimeError as err:
        return "n/a" if "no implementation" in str(err) else f"unavailable: {err}"
    if (
        device.type == "cpu"
        and backend == "triton"
        and dtype == torch.bfloat16
        and op in INTERPRETER_NO_BF16
    ):
        return "skipped: Triton's interpreter has no bf16 dots and truncates to bf16"
    try:
        compare(op, outputs(op, backend, dtype, device), dtype)
    except Exception as err:  # a row of the table, whatever went wrong
        return f"FAIL: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return "ok"
