"""The README's Python examples run as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first Python block after ``heading``."""
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def readme_example() -> str:
    return readme_block("## A training step with MGC")


def test_readme_example_runs_and_trains():
    scope: dict = {}
    exec(compile(readme_example(), str(README), "exec"), scope)
    loss = scope["loss"]
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in scope["backbone"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in scope["ema_backbone"].parameters())


def test_readme_example_is_short():
    step = readme_example().split("criterion = mk.MGCLoss()")[1]
    assert len(step.strip().splitlines()) <= 16


def test_readme_worker_pairs_example_runs():
    """Two worker processes sample the pairs with the C++ path; they equal the reference's."""
    scope: dict = {}
    exec(compile(readme_block("### Pairs in data-loader workers"), str(README), "exec"), scope)
    batch, criterion = scope["batch"], scope["criterion"]
    want = criterion.sample_pairs(
        batch["box1"], batch["flip1"], batch["box2"], batch["flip2"], backend="torch"
    )
    assert len(batch["pairs"]) == len(criterion.cells)
    for got, ref in zip(batch["pairs"], want):
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
