"""The benchmark suite's harness: ``python -m benchmarks --quick`` (what CI runs) writes complete,
sensible rows for every case, the plot command works (or says clearly that matplotlib is
missing), the plain-PyTorch baselines compute what the ops compute, and failures become rows.

Timings are never asserted beyond being positive: benchmarks are not timed tests."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import device, providers, runner
from benchmarks.cases import CASES, FWD, FWD_BWD, Case, Problem
from benchmarks.measure import QUICK
from benchmarks.results import FIELDS

REPO = Path(__file__).resolve().parents[1]

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_module(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``(completed process, rows, results file)`` of one ``--quick`` run."""
    out = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    proc = run_module("benchmarks", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return proc, rows, out


def test_quick_prints_a_table(quick):
    proc, rows, _ = quick
    assert "median ms" in proc.stdout and "peak memory is not measured on CPU" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.split(" ")[0] in CASES]
    assert len(table) == len(rows)


def test_quick_rows_are_complete_and_sensible(quick):
    _, rows, _ = quick
    assert rows
    for row in rows:
        assert set(FIELDS) <= set(row), set(FIELDS) - set(row)
        assert row["case"] in CASES and row["provider"] in providers.QUICK_PROVIDERS
        assert row["mode"] in CASES[row["case"]].modes
        assert row["dtype"] == "fp32" and row["device"].startswith("cpu") and row["threads"] == 1
        assert row["torch"] == torch.__version__ and row["commit"]
        assert row["peak_extra_mb"] is None  # not measured on CPU
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), row["status"]
        if row["status"] == "ok":
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            has_work = row["case"] != "sample_pairs"
            assert ((row["tflops"] or row["gbps"] or 0) > 0) == has_work
            assert row["fraction_of_peak"] is None  # no published peak for a CPU
        else:
            assert row["median_ms"] is None and len(row["status"]) > len("skipped: ")


def test_quick_covers_every_case_and_mode(quick):
    _, rows, _ = quick
    ran = {(r["case"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert ran == {(name, mode) for name, case in CASES.items() for mode in case.modes}


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_writes_pngs(quick, tmp_path):
    _, rows, out = quick
    proc = run_module("benchmarks.plot", str(out), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    charts = {(r["case"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert len(list(tmp_path.glob("*.png"))) == len(charts)


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed")
def test_plot_says_matplotlib_is_missing(quick, tmp_path):
    _, _, out = quick
    proc = run_module("benchmarks.plot", str(out), "--out-dir", str(tmp_path))
    assert proc.returncode != 0 and "pip install matplotlib" in proc.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name", [n for n in CASES if n != "sample_pairs"])
def test_formula_matches_the_op(name):
    """The naive/torch_compile baselines compute the op's value and gradients."""
    case = CASES[name]
    problem = case.build(**case.quick_sizes[0], dtype=torch.float64, device=torch.device("cpu"))
    for tensor in problem.grad_inputs:
        tensor.requires_grad_(True)
    results = []
    for fn in (lambda: problem.op("torch"), problem.formula):
        out = fn()
        problem.backward(out)
        results.append((out, [t.grad for t in problem.grad_inputs]))
        for tensor in problem.grad_inputs:
            tensor.grad = None
    (op_out, op_grads), (formula_out, formula_grads) = results
    torch.testing.assert_close(formula_out, op_out, check_dtype=False)
    torch.testing.assert_close(formula_grads, op_grads)


def fake_case(error):
    def build(batch, dtype, device):
        def op(backend):
            raise error

        return Problem(shapes={"B": batch}, op=op, formula=None, dtype=dtype)

    return Case("fake", "info_nce", build, (), ({"batch": 1},), (FWD,))


def wrapped_oom():
    """An OOM inside another error, as torch.compile re-raises it."""
    error = RuntimeError("compiled graph failed")
    error.__cause__ = torch.OutOfMemoryError("out of memory")
    return error


@pytest.mark.parametrize("error, status", [
    (torch.OutOfMemoryError("out of memory"), "OOM"),
    (wrapped_oom(), "OOM"),
    (ValueError("bad input\nmore"), "error: ValueError: bad input"),
])
def test_failures_become_rows(error, status):
    target = device.target(torch.device("cpu"))
    rows = list(runner.run(fake_case(error), {"batch": 1}, (FWD, FWD_BWD), ("torch", "naive"),
                           torch.float32, target, QUICK))
    assert [(r["provider"], r["mode"]) for r in rows] == [("torch", FWD), ("naive", FWD)]
    assert rows[0]["status"] == status and rows[0]["median_ms"] is None
    assert rows[1]["status"].startswith("skipped: ")


def test_device_peaks():
    h100 = "NVIDIA H100 80GB HBM3"
    assert device.slug(h100) == "nvidia-h100-80gb-hbm3"
    assert device.matmul_fraction(494.7, h100, torch.bfloat16) == pytest.approx(0.5)
    assert device.matmul_fraction(494.7, h100, torch.float32) is None  # no single fp32 peak
    assert device.memory_fraction(2400.0, "NVIDIA H200") == pytest.approx(0.5)
    assert device.memory_fraction(1000.0, "NVIDIA GeForce RTX 4090") is None
