"""Runs one case at one size through every mode and provider, yielding result rows.

A provider that cannot run is a ``skipped`` row, running out of memory an ``OOM`` row (memory
is freed and the sweep goes on), any other failure an ``error`` row.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from . import providers
from .cases import FWD_BWD, Case, Problem, Unavailable, variant
from .device import Target
from .measure import Budget, measure
from .results import make_row


def run(
    case: Case,
    size: dict,
    modes,
    provider_names,
    dtype: torch.dtype,
    target: Target,
    budget: Budget,
) -> Iterator[dict]:
    modes = [m for m in case.modes if m in modes]
    label = variant(size)
    try:
        problem, status = case.build(**size, dtype=dtype, device=target.device), None
    except torch.OutOfMemoryError:  # the inputs alone do not fit
        problem, status = None, "OOM"
    except Unavailable as err:
        problem, status = None, f"skipped: {err}"
    if problem is None:
        _free_memory()
        shapes = {"B": size["batch"], **{k: v for k, v in size.items() if k != "batch"}}
        for mode in modes:
            for provider in provider_names:
                yield make_row(case.name, label, shapes, mode, provider, dtype, target, status)
        return
    for mode in modes:
        for provider in provider_names:
            yield _run_one(case, label, problem, mode, provider, target, budget)
    del problem
    _free_memory()


def _run_one(
    case: Case,
    label: str,
    problem: Problem,
    mode: str,
    provider: str,
    target: Target,
    budget: Budget,
) -> dict:
    def row(status, timing=None):
        flops, traffic = problem.work(provider, mode)
        return make_row(
            case.name,
            label,
            problem.shapes,
            mode,
            provider,
            problem.dtype,
            target,
            status,
            timing,
            flops=flops,
            traffic=traffic,
        )

    for tensor in problem.grad_inputs:
        tensor.requires_grad_(mode == FWD_BWD)
    try:
        fn = providers.make(provider, case, problem, target.device)
    except Exception as err:  # a baseline that cannot be set up is a row, not a crash
        return row("OOM" if _out_of_memory(err) else f"error: {_describe(err)}")
    if isinstance(fn, str):
        return row(f"skipped: {fn}")
    step, prepare = _step(fn, problem, mode), _drop_grads(problem)
    status, timing = "ok", None
    try:
        timing = measure(step, prepare, target.device, budget)
    except Exception as err:  # one broken provider must not end a long sweep
        status = "OOM" if _out_of_memory(err) else f"error: {_describe(err)}"
    prepare()
    if status != "ok":
        _free_memory()
    return row(status, timing)


def _step(fn, problem: Problem, mode: str):
    def step() -> None:
        out = fn()
        if mode == FWD_BWD:
            problem.backward(out)

    return step


def _drop_grads(problem: Problem):
    def prepare() -> None:
        for tensor in problem.grad_inputs:
            tensor.grad = None

    return prepare


def _out_of_memory(err: BaseException) -> bool:
    """An OOM, also when wrapped (torch.compile re-raises errors inside its own)."""
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _describe(err: BaseException) -> str:
    """The error's type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
