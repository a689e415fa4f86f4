"""``python -m benchmarks.gpu_check --out DIR``: validate and measure the library on a CUDA GPU in
at most eight minutes; ``--dry-run`` runs every phase on the CPU at tiny sizes (Triton through its
interpreter) so that CI keeps the command working between GPU sessions.

Phases, each in processes of its own with its own time cap (a failure or a hang in one never
costs the next; a phase out of time is killed and reported so):

  env       GPU, driver, clocks, torch / Triton / nvcc versions, ``python -m mgc_kernels.env
            --build-native`` (the native extension, CUDA included, built once)
  smoke     every op on every backend in fp32, bf16 and fp16, tiny shapes, forward and backward:
            a pass/fail table per (op, backend, dtype) with the first line of each error
  headline  the correctness checks at the sizes of the performance targets, bf16, against the
            reference by the tolerance rule (geometry bit for bit)
  tests     ``pytest tests/gpu`` in parallel processes, a timeout per test, slowest files last
  bench     the headline benchmarks, the library's backends and ``torch_attention`` first,
            then the other baselines; rows appended to ``benchmarks/results/<gpu>.jsonl`` and
            ``.csv`` and copied to DIR
  kernels   registers, spills, shared memory, warps, stages and the SASS loops of every Triton
            kernel variant compiled during the check

DIR receives gpu_check.log, summary.md, summary.json, benchmarks.jsonl, benchmarks.csv,
junit.xml and kernels.jsonl. Exit status 0 when every phase passed, 1 otherwise, 2 when there is
no GPU (and no --dry-run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import summary
from .smoke import OPS

REPO = Path(__file__).resolve().parents[2]
SLOWEST_TEST_FILES = ("test_triton_info_nce.py", "test_pretrain_cuda.py")
TEST_TIMEOUT_S = 60


@dataclass(frozen=True)
class Phase:
    name: str
    cap_s: float


PHASES = (
    Phase("env", 100),
    Phase("smoke", 70),
    Phase("headline", 80),
    Phase("tests", 120),
    Phase("bench", 90),
    Phase("kernels", 20),
)


def parse_args(argv=None) -> argparse.Namespace:
    summary_line, rest = __doc__.split("\n", 1)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=summary_line,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument(
        "--dry-run", action="store_true", help="every phase on the CPU at tiny sizes (what CI runs)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=sum(p.cap_s for p in PHASES),
        help="seconds for all phases together (default: the sum of the caps)",
    )
    return parser.parse_args(argv)


def phase_commands(phase: Phase, args, work: Path, deadline: float) -> list[list[str]]:
    """The processes of a phase (several run side by side)."""
    if phase.name == "tests":
        return [pytest_command(args.out, args.dry_run)]
    base = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check.phases",
        phase.name,
        "--work",
        str(work),
        "--out",
        str(args.out),
        "--deadline",
        str(deadline),
    ] + (["--dry-run"] * args.dry_run)
    if phase.name == "smoke":
        return [base + ["--op", op] for op in OPS]
    return [base]


def pytest_command(out: Path, dry_run: bool) -> list[str]:
    files = sorted(
        (REPO / "tests" / "gpu").glob("test_*.py"),
        key=lambda p: (
            p.name in SLOWEST_TEST_FILES,
            SLOWEST_TEST_FILES.index(p.name) if p.name in SLOWEST_TEST_FILES else 0,
            p.name,
        ),
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'junit.xml'}",
        *map(str, files),
    ]
    if importlib.util.find_spec("xdist"):
        command += ["-n", "2" if dry_run else "8"]
    if importlib.util.find_spec("pytest_timeout"):
        command += [f"--timeout={TEST_TIMEOUT_S}"]
    return command


def run_phase(phase: Phase, commands: list[list[str]], env: dict, cap: float, log) -> dict:
    """Run the phase's processes side by side for at most ``cap`` seconds; their output goes to
    the log, one process after the other."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as outputs:
        sinks = [open(Path(outputs) / f"{i}.txt", "w+") for i in range(len(commands))]
        codes = _run_side_by_side(commands, sinks, env, start + cap)
        for sink, command, code in zip(sinks, commands, codes):
            sink.seek(0)
            log.write(f"\n--- {' '.join(command[2:])} (exit {code})\n{sink.read()}")
            sink.close()
    elapsed = time.monotonic() - start
    status = (
        "timed out"
        if None in codes
        else "ok"
        if all(c == 0 for c in codes)
        else f"exit {max(codes, key=abs)}"
    )
    log.write(f"=== phase {phase.name}: {status} in {elapsed:.1f} s (cap {cap:.0f} s)\n")
    log.flush()
    return {
        "phase": phase.name,
        "status": status,
        "seconds": round(elapsed, 1),
        "cap_s": round(cap),
    }


def _run_side_by_side(commands, sinks, env: dict, deadline: float) -> list:
    """Exit codes of ``commands``, at most one process per CPU core at a time; processes still
    running at ``deadline`` are killed and those not started by then never run (code None)."""
    waiting, running = list(zip(commands, sinks, range(len(commands)))), {}
    codes: list = [None] * len(commands)
    while (waiting or running) and time.monotonic() < deadline:
        while waiting and len(running) < (os.cpu_count() or 1):
            command, sink, i = waiting.pop(0)
            running[i] = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for i, proc in list(running.items()):
            if proc.poll() is not None:
                codes[i] = running.pop(i).returncode
        time.sleep(0.1)
    for proc in running.values():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return codes


def child_env(args, work: Path, phase: Phase, deadline: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(work / "triton")}
    # tests/gpu's conftest skips what would start after this, so pytest ends with its report
    env["MGC_GPU_CHECK_DEADLINE"] = str(deadline - TEST_TIMEOUT_S / 2)
    # the interpreter only where a dry run computes (the kernels phase compiles for a GPU), never
    # inherited (pytest's conftest sets it on CPU machines)
    env.pop("TRITON_INTERPRET", None)
    if args.dry_run and phase.name != "kernels":
        env["TRITON_INTERPRET"] = "1"
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; --dry-run runs the phases on the CPU", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("benchmarks.jsonl", "benchmarks.csv", "junit.xml"):
        (args.out / stale).unlink(missing_ok=True)
    end = time.monotonic() + args.budget
    phases = []
    with tempfile.TemporaryDirectory() as tmp, open(args.out / "gpu_check.log", "w") as log:
        work = Path(tmp)
        for phase in PHASES:
            cap = min(phase.cap_s, end - time.monotonic())
            if cap < 5:
                phases.append({"phase": phase.name, "status": "not run: budget spent"})
                continue
            deadline = time.time() + cap
            commands = phase_commands(phase, args, work, deadline)
            print(f"gpu_check: {phase.name} (cap {cap:.0f} s)", flush=True)
            phases.append(
                run_phase(phase, commands, child_env(args, work, phase, deadline), cap, log)
            )
            print(
                f"gpu_check: {phase.name}: {phases[-1]['status']} in {phases[-1]['seconds']} s",
                flush=True,
            )
        report = summary.collect(phases, work, args.out, args.dry_run)
    (args.out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary.markdown(report))
    print(summary.markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
