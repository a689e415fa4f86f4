"""The GPU check's verdict: the phases' records gathered into one report (summary.json) and a
Markdown page of tables (summary.md)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .smoke import BACKENDS, DTYPES, OPS

SMOKE_PASSING = ("ok", "n/a", "skipped")


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def junit(path: Path) -> dict:
    """Counts and failures of a pytest junit file (``{"status": "no report"}`` without one)."""
    if not path.exists():
        return {"status": "no report (pytest was killed at the cap)"}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for problem in (case.find("failure"), case.find("error")):
            if problem is not None:
                message = (problem.get("message") or "").splitlines()
                failed.append(
                    f"{case.get('classname')}::{case.get('name')}: "
                    f"{message[0] if message else problem.tag}"[:300]
                )
    bad = counts["failures"] + counts["errors"]
    return {**counts, "failed": failed, "status": "ok" if not bad else f"{bad} failed"}


def collect(phases: list[dict], work: Path, out: Path, dry_run: bool) -> dict:
    report = {
        "dry_run": dry_run,
        "phases": phases,
        **{
            name: _load(work / f"{name}.jsonl")
            for name in ("env", "smoke", "headline", "bench", "kernels")
        },
        "tests": junit(out / "junit.xml"),
    }
    with open(out / "kernels.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in report["kernels"])
    report["passed"] = not failures(report)
    report["failures"] = failures(report)
    return report


def failures(report: dict) -> list[str]:
    """What failed, one line each (empty: the check passed)."""
    lines = [f"phase {p['phase']}: {p['status']}" for p in report["phases"] if p["status"] != "ok"]
    lines += [
        f"smoke {r['op']} {r['backend']} {r['dtype']}: {r['status']}"
        for r in report["smoke"]
        if not r["status"].startswith(SMOKE_PASSING)
    ]
    lines += [
        f"headline {r['check']} {r['backend']}: {r['status']} {r.get('values', '')}"
        for r in report["headline"]
        if r["status"] != "ok"
    ]
    lines += [f"tests/gpu: {line}" for line in report["tests"].get("failed", [])]
    lines += [
        f"bench {r['case']} {r.get('mode', '')} {r.get('provider', '')}: {r['status']}"
        for r in report["bench"]
        if r["status"].startswith("error")
    ]
    lines += [
        f"kernel {r['kernel']}: {r.get('error') or '; '.join(r['launch_problems'])}"
        for r in report["kernels"]
        if r.get("error") or r.get("launch_problems")
    ]
    return lines


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value).replace("|", "/")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _smoke_rows(smoke: list[dict]) -> list[list]:
    """One row per (op, backend) in the order of ``smoke.OPS`` and ``smoke.BACKENDS`` (the
    processes finish in any order)."""
    cells: dict[tuple, dict] = {}
    for r in smoke:
        cells.setdefault((r["op"], r["backend"]), {})[r["dtype"]] = r["status"][:120]
    return [
        [op, backend, *(cells[op, backend].get(d) for d in DTYPES)]
        for op in OPS
        for backend in BACKENDS
        if (op, backend) in cells
    ]


def markdown(report: dict) -> str:
    env = report["env"][0] if report["env"] else {}
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"# GPU check{' (dry run)' if report['dry_run'] else ''}: "
        f"{env.get('device', '?')}: {verdict}",
        "",
    ]
    lines += [
        f"- {k}: {env.get(k)}"
        for k in ("gpu", "torch", "torch_cuda", "triton", "nvcc", "python", "commit")
    ]
    total = sum(p.get("seconds", 0) for p in report["phases"])
    lines += [f"- wall time of the phases: {total:.0f} s", "", "## Phases", ""]
    lines += _table(
        ["phase", "status", "seconds", "cap s"],
        [[p["phase"], p["status"], p.get("seconds"), p.get("cap_s")] for p in report["phases"]],
    )
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {line}" for line in report["failures"]]
    lines += ["", "## Smoke (op x backend x dtype)", ""]
    lines += _table(["op", "backend", *DTYPES], _smoke_rows(report["smoke"]))
    lines += ["", "## Headline checks (excess over the rule; <= 0 passes)", ""]
    lines += _table(
        ["check", "backend", "dtype", "batch", "status", "seconds", "values"],
        [
            [
                r["check"],
                r["backend"],
                r["dtype"],
                r["batch"],
                r["status"],
                r.get("seconds"),
                json.dumps(r.get("values", {})),
            ]
            for r in report["headline"]
        ],
    )
    tests = report["tests"]
    lines += [
        "",
        "## tests/gpu",
        "",
        f"status: {tests['status']}; "
        + ", ".join(
            f"{k} {tests[k]}" for k in ("tests", "failures", "errors", "skipped") if k in tests
        ),
    ]
    lines += [f"- {line}" for line in tests.get("failed", [])]
    lines += ["", "## Benchmarks", ""]
    lines += _table(
        [
            "case",
            "variant",
            "mode",
            "provider",
            "dtype",
            "median ms",
            "TFLOP/s",
            "GB/s",
            "% peak",
            "peak MiB",
            "status",
        ],
        [
            [
                r["case"],
                r.get("variant"),
                r.get("mode"),
                r.get("provider"),
                r.get("dtype"),
                r.get("median_ms"),
                r.get("tflops"),
                r.get("gbps"),
                None if r.get("fraction_of_peak") is None else 100 * r["fraction_of_peak"],
                r.get("peak_extra_mb"),
                r["status"],
            ]
            for r in report["bench"]
        ],
    )
    lines += ["", "## Compiled Triton kernels", ""]
    lines += _table(
        ["kernel", "regs", "spill bytes", "shared bytes", "warps", "stages", "problems"],
        [
            [
                r["kernel"],
                r.get("regs"),
                r.get("spill_bytes"),
                r["shared_bytes"],
                r["num_warps"],
                r["num_stages"],
                r.get("error") or "; ".join(r.get("launch_problems", [])) or "-",
            ]
            for r in report["kernels"]
        ],
    )
    return "\n".join(lines) + "\n"
