"""Run a function on several CPU processes joined by a gloo process group (test helper).

Usage::

    def _check(rank, world_size, seed):  # module level, so it pickles
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
        mine = x.chunk(world_size)[rank]  # every rank builds the whole batch, slices its part
        ...
        return {"loss": loss.detach(), "grad": mine_leaf.grad}

    results = run_ranks(_check, 2, 0)            # [result of rank 0, result of rank 1]

Return values travel back serialised with ``torch.save``, so CPU tensors and plain Python values
(dicts, lists, numbers) all work. An exception in any rank is re-raised here as a RuntimeError
that carries the child's traceback; a hang fails after ``timeout`` seconds.
"""

from __future__ import annotations

import io
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, timeout, fn, args, results):
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 120.0) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    ``fn`` must be a module-level (picklable) function; ``args`` must pickle too. Returns the
    per-rank return values, in rank order.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, timeout, fn, args, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    error = None
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size and error is None:
            if time.monotonic() > deadline:
                error = f"run_ranks: timed out after {timeout:.0f} s; ranks done: {sorted(values)}"
                break
            try:
                r, ok, payload = results.get(timeout=0.5)
            except queue_module.Empty:
                dead = [
                    (i, p.exitcode)
                    for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in values
                ]
                if dead:
                    error = f"run_ranks: rank(s) died without reporting (rank, exitcode): {dead}"
                continue
            if ok:
                values[r] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                error = f"run_ranks: rank {r} of {world_size} raised:\n{payload}"
    finally:
        for p in procs:
            p.join(timeout=0 if error else 10)
        for p in procs:  # only the processes started above
            if p.is_alive():
                p.terminate()
                p.join(5)
        results.close()
    if error is not None:
        raise RuntimeError(error)
    return [values[r] for r in range(world_size)]
