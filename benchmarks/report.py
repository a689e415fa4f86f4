"""``python -m benchmarks.report [RESULTS.jsonl ...] [--readme README.md]``: Markdown tables of
the results, one per device and dtype, written into the README between its markers.

Each cell is a provider's median time in ms with its speed-up over the ``torch`` reference
(``2.5 ms (4.1x)``), ``OOM``, or ``-`` (skipped or not run); GPU tables add the peak extra memory.
Where a file holds the same measurement more than once, the last row wins (results are
appended). The README's table is this command's output and a test checks that it still is.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from . import results
from .cases import CASES
from .providers import PROVIDERS

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        help="JSON-lines result files (default: benchmarks/results/*.jsonl)",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        help=f"replace the text between {BEGIN} and {END} in this file (default: print the tables)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = markdown(latest(load(args.files or default_files())))
    if args.readme is None:
        print(text)
        return 0
    args.readme.write_text(splice(args.readme.read_text(), text, args.readme))
    print(f"updated {args.readme}")
    return 0


def default_files() -> list[Path]:
    return sorted(results.RESULTS_DIR.glob("*.jsonl"))


def load(paths) -> list[dict]:
    return [row for path in paths for row in results.load(path)]


def key(row: dict) -> tuple:
    """What a row measures: device, dtype, case, variant, batch, mode, provider."""
    return (
        row["device"],
        row["dtype"],
        row["case"],
        row["variant"],
        row["shapes"]["B"],
        row["mode"],
        row["provider"],
    )


def latest(rows: list[dict]) -> dict[tuple, dict]:
    return {key(row): row for row in rows}


def splice(document: str, text: str, name) -> str:
    """``document`` with the text between the markers replaced by ``text``."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(document):
        raise SystemExit(f"{name} has no {BEGIN} ... {END} block to write the tables into")
    return pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", document, count=1)


def markdown(rows: dict[tuple, dict]) -> str:
    tables: dict[tuple, dict] = defaultdict(dict)
    for (device, dtype, *measure), row in rows.items():
        tables[(device, dtype)][tuple(measure)] = row
    return "\n\n".join(
        _table(device, dtype, tables[(device, dtype)]) for device, dtype in sorted(tables)
    )


def _table(device: str, dtype: str, rows: dict[tuple, dict]) -> str:
    gpu = not device.startswith("cpu")
    shown = [
        p
        for p in PROVIDERS
        if any(r["provider"] == p and r["status"] in ("ok", "OOM") for r in rows.values())
    ]
    lines = [
        _caption(device, dtype, rows),
        "",
        "| case | variant | B | mode | " + " | ".join(shown) + " |",
        "|---|---|---:|---|" + "---:|" * len(shown),
    ]
    for case, variant, batch, mode in sorted({m[:4] for m in rows}, key=_order):
        reference = rows.get((case, variant, batch, mode, "torch"))
        cells = [_cell(rows.get((case, variant, batch, mode, p)), reference, gpu) for p in shown]
        lines.append(
            f"| {case} | {variant or '-'} | {batch} | {mode} | " + " | ".join(cells) + " |"
        )
    shares = _loss_shares(rows)
    return "\n".join(lines + ([""] + shares if shares else []))


def _caption(device: str, dtype: str, rows: dict[tuple, dict]) -> str:
    first = next(iter(rows.values()))
    commits = sorted({r["commit"] for r in rows.values()})
    where = (
        f"{first['threads']} torch thread(s), no peak memory on CPU"
        if device.startswith("cpu")
        else "ms (speed-up over torch) / peak extra MiB"
    )
    return (
        f"**{device}**, {dtype}, torch {first['torch']}, triton {first['triton'] or '-'}, "
        f"commit {', '.join(commits)}; {where}"
    )


def _order(measure: tuple):
    case, variant, batch, mode = measure
    names = list(CASES)
    return (names.index(case) if case in names else len(names), case, variant, batch, mode)


def _cell(row: dict | None, reference: dict | None, gpu: bool) -> str:
    if row is None or row["status"].startswith(("skipped", "error")):
        return "-"
    if row["status"] == "OOM":
        return "OOM"
    text = _ms(row["median_ms"])
    if reference and reference["status"] == "ok" and row["provider"] != "torch":
        text += f" ({reference['median_ms'] / row['median_ms']:.2g}x)"
    if gpu and row["peak_extra_mb"] is not None:
        text += f" / {row['peak_extra_mb']:.0f}"
    return text


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _loss_shares(rows: dict[tuple, dict]) -> list[str]:
    """One line per (batch, provider) with both parts of ``mgc_train_step``."""
    lines = []
    for (case, variant, batch, mode, provider), step in sorted(rows.items()):
        if case != "mgc_train_step" or "part=step" not in variant or step["status"] != "ok":
            continue
        loss = rows.get((case, variant.replace("part=step", "part=loss"), batch, mode, provider))
        if loss and loss["status"] == "ok":
            arch = step["shapes"].get("arch")
            lines.append(
                f"- MGC training step ({arch}, B={batch}, backend {provider}): "
                f"{_ms(step['median_ms'])} ms, of which the loss path "
                f"{_ms(loss['median_ms'])} ms "
                f"({100 * loss['median_ms'] / step['median_ms']:.2g} %)."
            )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
