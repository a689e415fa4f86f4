"""``python -m benchmarks.plot RESULTS.jsonl [...] --out-dir DIR``: PNG charts of the results.

One chart per (device, case, variant, mode, dtype): median time (with the 20-80 % band) and peak
extra memory against the batch size, one line per provider. Where a file holds the same measurement
more than once, the last row wins (results are appended). Needs matplotlib (``pip install
matplotlib``, or the ``bench`` extra), which is imported only here.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from . import results
from .device import slug


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("files", nargs="+", type=Path, help="JSON-lines result files")
    parser.add_argument("--out-dir", type=Path, default=results.RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        pyplot = _pyplot()
    except ImportError:
        print(
            "benchmarks.plot needs matplotlib, which is not installed: "
            "pip install matplotlib  (or pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return 2
    rows = [row for path in args.files for row in results.load(path)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for key, series in _charts(rows).items():
        path = args.out_dir / ("__".join(slug(part) for part in key if part) + ".png")
        _draw(pyplot, key, series, path)
        print(path)
    return 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _charts(rows) -> dict:
    """``{(device, case, variant, mode, dtype): {provider: {batch: row}}}`` of the rows that
    ran."""
    charts: dict = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["status"] in ("ok", "OOM"):
            key = (row["device"], row["case"], row["variant"], row["mode"], row["dtype"])
            charts[key][row["provider"]][row["shapes"]["B"]] = row
    return charts


def _draw(pyplot, key, series: dict, path: Path) -> None:
    device, case, variant, mode, dtype = key
    figure, (time_ax, memory_ax) = pyplot.subplots(1, 2, figsize=(11, 4))
    for provider, by_batch in sorted(series.items()):
        ok = [by_batch[b] for b in sorted(by_batch) if by_batch[b]["status"] == "ok"]
        ooms = sorted(b for b, row in by_batch.items() if row["status"] == "OOM")
        label = provider + (f" (OOM at B={', '.join(map(str, ooms))})" if ooms else "")
        batch = [row["shapes"]["B"] for row in ok]
        (line,) = time_ax.plot(batch, [row["median_ms"] for row in ok], "o-", label=label)
        time_ax.fill_between(
            batch,
            [row["p20_ms"] for row in ok],
            [row["p80_ms"] for row in ok],
            color=line.get_color(),
            alpha=0.2,
        )
        memory = [
            (row["shapes"]["B"], row["peak_extra_mb"])
            for row in ok
            if row["peak_extra_mb"] is not None
        ]
        if memory:
            memory_ax.plot(*zip(*memory), "o-", color=line.get_color(), label=provider)
    batches = sorted({b for by_batch in series.values() for b in by_batch})
    _axes(time_ax, "median time (ms)", batches)
    _axes(memory_ax, "peak extra memory (MiB)", batches)
    if not memory_ax.lines:
        memory_ax.text(
            0.5,
            0.5,
            "peak memory not measured on CPU" if device.startswith("cpu") else "no memory figures",
            ha="center",
            va="center",
            transform=memory_ax.transAxes,
        )
    time_ax.legend(fontsize=8)
    figure.suptitle(f"{case} {variant} {mode} {dtype} on {device}".replace("  ", " "))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _axes(ax, ylabel: str, batches: list) -> None:
    ax.set_xlabel("batch size B")
    ax.set_ylabel(ylabel)
    if ax.lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xticks([], minor=True)
    ax.grid(True, which="both", alpha=0.3)


if __name__ == "__main__":
    raise SystemExit(main())
