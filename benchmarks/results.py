"""Result rows: their fields, the JSON-lines file and the printed table.

One row per (case, size, mode, provider, dtype); ``variant`` names what sets a size apart besides
the batch (``"cell=2"``; empty when nothing does). ``status`` is ``"ok"``, ``"OOM"``,
``"skipped: <why>"`` or ``"error: <what>"``; timings are in ms, ``peak_extra_mb`` in MiB (null on
CPU, where memory is not measured), ``tflops``/``gbps`` the achieved matmul TFLOP/s or memory
GB/s (see ``cases``) and ``fraction_of_peak`` their share of the device's published peak (null
where the device or dtype has none in ``device.PEAKS``). ``threads`` is torch's CPU thread
count on CPU (null on CUDA); ``commit`` ends in ``-dirty`` when tracked files had changes.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import subprocess
from pathlib import Path

import torch

import mgc_kernels

from . import device as devices
from .measure import Timing

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = (
    "case",
    "variant",
    "shapes",
    "mode",
    "provider",
    "dtype",
    "device",
    "threads",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_extra_mb",
    "tflops",
    "gbps",
    "fraction_of_peak",
    "status",
    "mgc_kernels",
    "torch",
    "triton",
    "commit",
    "timestamp",
)
TIMING_FIELDS = ("median_ms", "p20_ms", "p80_ms", "peak_extra_mb")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


@functools.cache
def versions() -> dict:
    """Library versions and the git commit (``-dirty`` when tracked files differ from it)."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {
        "mgc_kernels": mgc_kernels.__version__,
        "torch": torch.__version__,
        "triton": triton,
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def make_row(
    case: str,
    variant: str,
    shapes: dict,
    mode: str,
    provider: str,
    dtype: torch.dtype,
    target: devices.Target,
    status: str,
    timing: Timing | None = None,
    flops: float | None = None,
    traffic: float | None = None,
) -> dict:
    """A result row; throughput only for ``ok`` rows of cases that count FLOPs or bytes."""
    seconds = timing.median_ms * 1e-3 if timing else None
    tflops = flops / seconds / 1e12 if seconds and flops else None
    gbps = traffic / seconds / 1e9 if seconds and traffic else None
    fraction = (
        devices.matmul_fraction(tflops, target.name, dtype)
        if tflops is not None
        else devices.memory_fraction(gbps, target.name)
    )
    return {
        "case": case,
        "variant": variant,
        "shapes": shapes,
        "mode": mode,
        "provider": provider,
        "dtype": dtype_name(dtype),
        "device": target.name,
        "threads": target.threads,
        **(dataclasses.asdict(timing) if timing else dict.fromkeys(TIMING_FIELDS)),
        "tflops": tflops,
        "gbps": gbps,
        "fraction_of_peak": fraction,
        "status": status,
        **versions(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def default_path(device_name: str) -> Path:
    return RESULTS_DIR / f"{devices.slug(device_name)}.jsonl"


def append(path: Path, row: dict) -> None:
    """Append ``row`` to the JSON-lines file ``path`` and to the CSV file beside it (same name,
    ``.csv``; ``shapes`` as JSON text), writing the CSV header when that file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    table = path.with_suffix(".csv")
    new = not table.exists() or table.stat().st_size == 0
    with open(table, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({**row, "shapes": json.dumps(row["shapes"])})


def load(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the printed table -----------------------------------------------------------------------

COLUMNS = (
    ("case", 18),
    ("variant", 22),
    ("B", 4),
    ("mode", 7),
    ("provider", 15),
    ("dtype", 5),
    ("median ms", 10),
    ("p20-p80 ms", 17),
    ("peak MiB", 9),
    ("TFLOP/s", 8),
    ("GB/s", 8),
    ("% peak", 6),
)


def table_header() -> str:
    head = " ".join(f"{title:<{width}}" for title, width in COLUMNS) + " status"
    return head + "\n" + "-" * len(head)


def table_line(row: dict) -> str:
    spread = f"{_num(row['p20_ms'])}-{_num(row['p80_ms'])}" if row["p20_ms"] is not None else "-"
    fraction = row["fraction_of_peak"]
    cells = (
        row["case"],
        row["variant"] or "-",
        row["shapes"].get("B", "-"),
        row["mode"],
        row["provider"],
        row["dtype"],
        _num(row["median_ms"]),
        spread,
        _num(row["peak_extra_mb"]),
        _num(row["tflops"]),
        _num(row["gbps"]),
        "-" if fraction is None else f"{100 * fraction:.0f}%",
    )
    return " ".join(f"{c!s:<{w}}" for c, (_, w) in zip(cells, COLUMNS)) + " " + row["status"]


def _num(value) -> str:
    """Three significant digits, without exponents for everyday magnitudes."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"
