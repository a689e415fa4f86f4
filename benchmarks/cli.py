"""``python -m benchmarks``: run the cases, append JSON lines and CSV rows, print a table.

Examples::

    python -m benchmarks --quick                      # CPU, tiny sizes, seconds (what CI runs)
    python -m benchmarks                              # the full sweep: GPU sizes in bf16 on a
                                                      # GPU, CPU sizes in fp32 without one
    python -m benchmarks --case info_nce_queue --provider torch triton --dtype fp16

Exit status 1 when any row is an ``error`` (OOM and skips are results, not errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import device as devices
from . import results, runner
from .cases import CASES, FWD, FWD_BWD, STEP
from .measure import FULL, QUICK
from .providers import PROVIDERS, QUICK_PROVIDERS


def parse_args(argv=None) -> argparse.Namespace:
    summary, examples = __doc__.split("\n", 1)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=summary,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU, tiny sizes, fp32, the providers that run on a CPU (for CI)",
    )
    parser.add_argument(
        "--case", nargs="+", choices=sorted(CASES), help="cases to run (default: all)"
    )
    parser.add_argument(
        "--provider",
        nargs="+",
        choices=PROVIDERS,
        help=f"providers (default: all; with --quick {' '.join(QUICK_PROVIDERS)})",
    )
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=(FWD, FWD_BWD, STEP),
        default=(FWD, FWD_BWD, STEP),
        help="fwd, fwd+bwd, step (a whole training step; default: all)",
    )
    parser.add_argument("--batch", nargs="+", type=int, help="only these batch sizes")
    parser.add_argument(
        "--dtype",
        choices=sorted(results.DTYPES),
        help="input dtype (default: bf16 on CUDA, fp32 on CPU and with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: 1 with --quick, else torch's choice)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON-lines file to append to, its CSV beside it (default: "
        "benchmarks/results/<device>.jsonl; with --quick the rows are only "
        "printed, so that smoke runs never enter the committed results)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    target = devices.target(
        torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    )
    threads = args.threads or (1 if args.quick else None)
    if threads and target.device.type == "cpu":
        torch.set_num_threads(threads)  # tiny ops on a busy machine stall on idle OpenMP threads
    dtype = results.DTYPES[args.dtype or ("bf16" if target.device.type == "cuda" else "fp32")]
    provider_names = args.provider or (QUICK_PROVIDERS if args.quick else PROVIDERS)
    out = args.out or (None if args.quick else results.default_path(target.name))
    jobs = [
        (case, size)
        for case in (CASES[n] for n in (args.case or CASES))
        for size in case.sweep(target.device, args.quick)
        if args.batch is None or size["batch"] in args.batch
    ]

    print(
        f"device: {target.name} | dtype: {results.dtype_name(dtype)} | "
        f"commit: {results.versions()['commit']} | results: {out or 'not written (--quick)'}"
    )
    if target.device.type == "cpu":
        print(
            f"CPU, {target.threads} torch thread(s): perf_counter timings; "
            "peak memory is not measured on CPU"
        )
    print(results.table_header())
    errors = 0
    for case, size in _progress(jobs):
        for row in runner.run(
            case, size, args.mode, provider_names, dtype, target, QUICK if args.quick else FULL
        ):
            if out is not None:
                results.append(out, row)
            print(results.table_line(row), flush=True)
            errors += row["status"].startswith("error")
    return 1 if errors else 0


def _progress(jobs: list):
    """A tqdm bar over the jobs when tqdm is installed and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        return jobs
    return tqdm(jobs, desc="benchmarks", leave=False, disable=not sys.stderr.isatty())
