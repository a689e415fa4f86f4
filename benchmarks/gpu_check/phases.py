"""One phase of the GPU check, in a process of its own (the orchestrator in ``__main__`` caps
its time and kills it if it hangs): ``python -m benchmarks.gpu_check.phases PHASE --work DIR
--out DIR --deadline EPOCH [--dry-run] [--op OP]``. Each phase appends JSON records to
``WORK/PHASE.jsonl`` as it goes, so that what finished before a kill is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import mgc_kernels as mk

from .. import device as devices
from .. import results, runner
from ..cases import CASES
from ..measure import FULL, QUICK
from . import headline, kernels, smoke

# the benchmark rows of the targets: (case, size filter), the most important first
BENCH_CASES = (
    ("geometric_info_nce", {"cell": 1}),
    ("info_nce_queue", {}),
    ("linear_soft_ce", {}),
    ("multigrain_pool", {}),
    ("sample_pairs", {}),
    ("correspondence", {}),
    ("info_nce_sparse", {}),
)
# providers in two passes: the library's first, then the baselines (torch.compile is slow to
# build: a dry run leaves it out to stay short)
# the library and the bar it must beat (PyTorch's attention kernels) first, then the rest
BENCH_PASSES = (
    ("triton", "native", "torch", "torch_attention"),
    ("torch_compile", "naive", "released", "lightly"),
)
DRY_RUN_PASSES = (
    ("triton", "native", "torch", "torch_attention"),
    ("naive", "released", "lightly"),
)
BENCH_BATCH = 256
REPO = Path(__file__).resolve().parents[2]


def _command(*argv: str) -> str:
    """First line of a tool's answer, or why there is none."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]}: not found"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if lines else f"{argv[0]}: no output"


def env(args, device):
    from mgc_kernels import env as report
    from mgc_kernels import native

    yield {
        "gpu": _command(
            "nvidia-smi",
            "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total",
            "--format=csv,noheader",
        ),
        "device": devices.name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": results.versions()["triton"],
        "nvcc": _command("nvcc", "--version"),
        "python": sys.version.split()[0],
        "commit": results.versions()["commit"],
    }
    native.build()  # C++ and CUDA, once: what --build-native does; the later phases load it
    print(report.report(), flush=True)
    yield {"backends": {b: _backend_status(b) for b in ("torch", "triton", "native")}}


def _backend_status(backend: str) -> str:
    loads, why = mk.backends.backend_status(backend)
    return f"{'yes' if loads else 'no'}: {why}"


def smoke_phase(args, device):
    for backend in smoke.BACKENDS:
        for name, dtype in smoke.DTYPES.items():
            start = time.perf_counter()
            status = smoke.status(args.op, backend, dtype, device)
            yield {
                "op": args.op,
                "backend": backend,
                "dtype": name,
                "status": status,
                "seconds": round(time.perf_counter() - start, 2),
            }


def headline_phase(args, device):
    # bf16 is the dtype of the targets; the interpreter runs fp16 dots but not bf16 ones
    dtype, size = (
        (torch.float16, headline.TINY) if args.dry_run else (torch.bfloat16, headline.FULL)
    )
    yield from headline.run(device, dtype, size, args.deadline)


def bench(args, device):
    target = devices.target(device)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    sink = args.out / "benchmarks.jsonl"
    committed = None if args.dry_run else results.default_path(target.name)
    for providers, margin in zip(DRY_RUN_PASSES if args.dry_run else BENCH_PASSES, (15, 60)):
        for name, extra in BENCH_CASES:
            if time.time() + margin > args.deadline:
                yield {
                    "case": name,
                    "providers": list(providers),
                    "status": "not run: the phase's time is up",
                }
                continue
            for row in runner.run(
                CASES[name],
                _bench_size(name, extra, args.dry_run),
                CASES[name].modes,
                providers,
                dtype,
                target,
                QUICK if args.dry_run else FULL,
            ):
                for path in filter(None, (sink, committed)):
                    results.append(path, row)
                print(results.table_line(row), flush=True)
                yield {
                    k: row[k]
                    for k in (
                        "case",
                        "variant",
                        "mode",
                        "provider",
                        "dtype",
                        "median_ms",
                        "peak_extra_mb",
                        "tflops",
                        "gbps",
                        "fraction_of_peak",
                        "status",
                    )
                }


def _bench_size(name: str, extra: dict, dry_run: bool) -> dict:
    case = CASES[name]
    sizes = (
        case.quick_sizes
        if dry_run
        else [
            s
            for s in case.sizes
            if s["batch"] == BENCH_BATCH and all(s.get(k) == v for k, v in extra.items())
        ]
    )
    return sizes[0]


def kernel_phase(args, device):
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    if args.dry_run:  # the interpreter compiled nothing: compile one kernel for sm_90 to read
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tests" / "triton_aot.py"),
                "--kernel",
                "region_boxes_kernel",
            ],
            check=True,
            timeout=120,
        )
    yield from kernels.variants(cache)


PHASES = {
    "env": env,
    "smoke": smoke_phase,
    "headline": headline_phase,
    "bench": bench,
    "kernels": kernel_phase,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.phases")
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="time.time() to stop by")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--op", choices=smoke.OPS)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    with open(args.work / f"{args.phase}.jsonl", "a") as sink:
        for record in PHASES[args.phase](args, device):
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
