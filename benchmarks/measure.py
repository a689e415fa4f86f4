"""Timing and peak memory of one benchmark step.

CUDA: the first call (compilation, autotuning, allocator growth) is not timed; warm-up calls
estimate the time per call, which sets the number of repeats; each repeat is timed with a pair
of CUDA events after overwriting a 256 MiB buffer so that no repeat starts with its inputs in
L2. Peak extra memory is ``max_memory_allocated`` during one call minus what was allocated just
before it (the inputs and anything else alive), in MiB.

CPU: ``time.perf_counter`` around each repeat; memory is not measured.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Budget:
    """How long to warm up and to measure, and the bounds on the number of repeats."""

    warmup_ms: float = 100.0
    measure_ms: float = 500.0
    min_reps: int = 5
    max_reps: int = 100


FULL = Budget()
QUICK = Budget(warmup_ms=5.0, measure_ms=20.0, min_reps=3, max_reps=10)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mb: float | None  # MiB; None where not measured (CPU)


def measure(
    step: Callable[[], None], prepare: Callable[[], None], device: torch.device, budget: Budget
) -> Timing:
    """Time ``step`` (``prepare`` runs untimed before every call, e.g. to drop gradients)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prepare()
    step()  # compile, autotune, grow the allocator
    sync()
    reps = _repeats(step, prepare, sync, budget)
    peak = _peak_extra_mb(step, prepare, device) if cuda else None
    times = _cuda_times(step, prepare, reps, device) if cuda else _cpu_times(step, prepare, reps)
    prepare()
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return Timing(statistics.median(times), p20, p80, peak)


def _repeats(step, prepare, sync, budget: Budget) -> int:
    """Warm up for ``budget.warmup_ms`` (one call at least) and size the measurement from it."""
    calls, spent = 0, 0.0
    while calls == 0 or spent < budget.warmup_ms * 1e-3:
        prepare()
        start = time.perf_counter()
        step()
        sync()
        spent += time.perf_counter() - start
        calls += 1
    per_call_ms = spent * 1e3 / calls
    return int(min(budget.max_reps, max(budget.min_reps, budget.measure_ms / per_call_ms)))


def _peak_extra_mb(step, prepare, device: torch.device) -> float:
    prepare()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _cuda_times(step, prepare, reps: int, device: torch.device) -> list[float]:
    flush = _l2_flush_buffer(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        prepare()
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _cpu_times(step, prepare, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        prepare()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@functools.cache
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
