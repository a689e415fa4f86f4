"""Which implementation runs a case: a callable, or the reason it cannot run here.

- ``torch``: the library op with ``backend="torch"`` (the reference).
- ``triton``: the library op with ``backend="triton"``; CUDA only (the CPU interpreter is a
  correctness tool, not a speed measure).
- ``torch_compile``: ``torch.compile`` of the case's plain-PyTorch formula.
- ``naive``: the same formula, eager.
- ``native``: the library op with ``backend="native"`` (csrc/), where it is built.
- ``released``: the released MGC pipeline's approach re-implemented (per-sample Python loops
  for correspondences, materialised logits for the loss: :mod:`benchmarks.released_mgc`), for
  the cases it covers.
- ``lightly``: lightly's comparable loss (:mod:`benchmarks.lightly_baselines`), for the cases
  where one exists; skipped when lightly is not installed (``pip install -e '.[bench]'``).
- ``torch_attention``: the loss and its gradients from PyTorch's fused attention kernels
  (:mod:`benchmarks.attention_baseline`), for the dense InfoNCE cases: the bar for the
  library's kernels; skipped where no kernel that returns the log-sum-exp runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

import mgc_kernels as mk

from . import lightly_baselines
from .cases import Case, Problem

PROVIDERS = (
    "torch",
    "triton",
    "native",
    "torch_compile",
    "naive",
    "released",
    "lightly",
    "torch_attention",
)
QUICK_PROVIDERS = ("torch", "naive", "released", "lightly", "torch_attention")
BASELINES = {
    "released": "the released MGC code has no counterpart of this case",
    "lightly": "lightly has no comparable loss for this case",
    "torch_attention": "no formulation of this case as fused attention calls",
}


def make(provider: str, case: Case, problem: Problem, device: torch.device) -> Callable | str:
    """The zero-argument callable that runs ``problem`` with ``provider``, or a skip reason."""
    if provider in ("torch", "triton", "native"):
        return _library(provider, case, problem, device)
    if provider in BASELINES:
        return _baseline(provider, problem)
    if provider not in ("torch_compile", "naive"):
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if problem.formula is None:
        return problem.no_formula
    if provider == "naive":
        return problem.formula
    torch.compiler.reset()  # fresh caches: a sweep over sizes would hit the recompile limit
    return torch.compile(problem.formula, dynamic=False)


def _library(backend: str, case: Case, problem: Problem, device: torch.device):
    if backend == "triton" and device.type != "cuda":
        return "triton is benchmarked on CUDA only (the CPU interpreter is no speed measure)"
    try:
        mk.backends.resolve(case.op_name, backend, device, problem.dtype)
    except RuntimeError as err:
        return str(err)
    return partial(problem.op, backend)


def _baseline(provider: str, problem: Problem):
    make_step = problem.baselines.get(provider)
    if make_step is None:
        return BASELINES[provider]
    if provider == "lightly" and lightly_baselines.unavailable():
        return lightly_baselines.unavailable()
    return make_step()
