"""The README's training-step example runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## A training step with MGC"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


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
