"""``python -m benchmarks.gpu_check``: the dry run (every phase on the CPU, Triton through its
interpreter) works end to end, and the check can fail: wrong numbers, errors and hangs show up
in its verdict instead of passing or stalling the next phase."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import __main__ as gpu_check
from benchmarks.gpu_check import headline, smoke, summary
from benchmarks.gpu_check.rule import excess

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "gpu_check.log",
    "summary.md",
    "summary.json",
    "benchmarks.jsonl",
    "benchmarks.csv",
    "junit.xml",
    "kernels.jsonl",
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*.*")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - start
    after = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*.*")}
    assert after == committed, "a dry run must not touch the committed results"
    return proc, out, json.loads((out / "summary.json").read_text()), seconds


def test_dry_run_passes_and_writes_its_files(dry_run):
    proc, out, report, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES
    assert report["passed"] and report["failures"] == []
    assert [p["phase"] for p in report["phases"]] == [p.name for p in gpu_check.PHASES]
    assert all(p["status"] == "ok" for p in report["phases"])
    assert "PASSED" in (out / "summary.md").read_text()
    print(f"dry run: {seconds:.0f} s")


def test_dry_run_smoke_covers_every_op_backend_and_dtype(dry_run):
    _, _, report, _ = dry_run
    cells = {(r["op"], r["backend"], r["dtype"]): r["status"] for r in report["smoke"]}
    assert set(cells) == {
        (o, b, d) for o in smoke.OPS for b in smoke.BACKENDS for d in smoke.DTYPES
    }
    assert all(cells[op, "torch", d] == "ok" for op in smoke.OPS for d in smoke.DTYPES)
    assert all(cells[op, "triton", "fp16"] == "ok" for op in smoke.OPS)
    assert cells["multigrain_pool", "native", "bf16"] == "ok"
    assert cells["info_nce", "native", "fp32"] == "n/a"


def test_dry_run_headline_checks_ran(dry_run):
    _, _, report, _ = dry_run
    ran = {(r["check"], r["backend"]): r for r in report["headline"]}
    assert set(ran) == {
        (check.__name__, b) for check, _, backends in headline.CHECKS for b in backends
    }
    assert all(r["status"] == "ok" and r["values"] for r in ran.values())


def test_dry_run_tests_and_benchmarks(dry_run):
    _, out, report, _ = dry_run
    tests = report["tests"]
    assert tests["status"] == "ok" and tests["tests"] > 100
    assert tests["skipped"] == tests["tests"]  # tests/gpu skips without CUDA
    rows = [json.loads(line) for line in (out / "benchmarks.jsonl").read_text().splitlines()]
    done = {(r["case"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert {(case, "torch") for case, _ in gpu_check_cases()} <= done
    assert ("multigrain_pool", "native") in done
    assert ("geometric_info_nce", "torch_attention") in done


def test_dry_run_reads_the_compiled_kernels(dry_run):
    """The interpreter compiles nothing: the dry run compiles one kernel for sm_90 into the
    check's Triton cache, and the kernels phase reads its resources from there."""
    _, out, report, _ = dry_run
    rows = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    assert rows == report["kernels"] and rows
    assert all(r["regs"] > 0 and r["launch_problems"] == [] for r in rows)
    assert all(loop["instructions"] > 0 for r in rows for loop in r["loops"])
    assert "region_boxes_kernel" in {r["kernel"] for r in rows}


def gpu_check_cases():
    from benchmarks.gpu_check.phases import BENCH_CASES

    return BENCH_CASES


# --------------------------------------------------------------------------- it can fail


@pytest.mark.parametrize("op", ["multigrain_pool", "correspondence", "sample_pairs"])
def test_wrong_numbers_fail_the_smoke_comparison(op):
    cpu = torch.device("cpu")
    got = smoke.outputs(op, "torch", torch.float32, cpu)
    smoke.compare(op, got, torch.float32)
    name, value = next(iter(got.items()))
    wrong = {**got, name: value + 1 if value.is_floating_point() else value.flip(-1)}
    with pytest.raises(AssertionError, match=name):
        smoke.compare(op, wrong, torch.float32)


def test_an_error_is_a_fail_row_with_its_first_line(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel launch failed\nsecond line")

    monkeypatch.setattr(smoke, "outputs", broken)
    status = smoke.status("info_nce", "torch", torch.float32, torch.device("cpu"))
    assert status == "FAIL: RuntimeError: kernel launch failed"


def test_the_rule_measures_the_excess():
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert excess(exact, exact, exact, 0.0) == 0.0
    assert excess(exact + 1e-3, exact, exact, 1e-4) == pytest.approx(9e-4)
    assert excess(exact + 1e-3, exact + 2e-3, exact, 0.0) < 0  # as close as the reference
    assert excess(torch.tensor([float("nan"), 2.0]), exact, exact, 1.0) == float("inf")


def test_failures_reach_the_verdict(tmp_path):
    phases = [
        {"phase": "smoke", "status": "ok", "seconds": 1.0},
        {"phase": "bench", "status": "timed out", "seconds": 9.0},
    ]
    work = tmp_path / "work"
    work.mkdir()
    (work / "smoke.jsonl").write_text(
        json.dumps({"op": "info_nce", "backend": "triton", "dtype": "bf16", "status": "FAIL: boom"})
        + "\n"
    )
    (work / "kernels.jsonl").write_text(
        json.dumps(
            {
                "kernel": "_dk_kernel",
                "regs": 255,
                "spill_bytes": 0,
                "shared_bytes": 300000,
                "num_warps": 8,
                "num_stages": 2,
                "launch_problems": ["needs 300000 bytes of shared memory per block"],
            }
        )
        + "\n"
    )
    report = summary.collect(phases, work, tmp_path, dry_run=True)
    assert not report["passed"]
    text = "\n".join(report["failures"])
    assert "phase bench: timed out" in text and "FAIL: boom" in text and "_dk_kernel" in text
    assert "tests/gpu" not in text and report["tests"]["status"].startswith("no report")
    assert "FAILED" in summary.markdown(report)


def test_a_hanging_phase_is_killed_at_its_cap():
    log = io.StringIO()
    start = time.monotonic()
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    quick = [sys.executable, "-c", "print('done')"]
    result = gpu_check.run_phase(gpu_check.Phase("smoke", 3), [quick, hang], {}, 3, log)
    assert time.monotonic() - start < 20
    assert result["status"] == "timed out"
    assert "done" in log.getvalue() and "(exit None)" in log.getvalue()


def test_without_a_gpu_it_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
