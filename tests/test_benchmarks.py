"""The benchmark suite's harness: ``python -m benchmarks --quick`` (what CI runs) writes complete,
sensible rows (JSON lines and CSV) for every case, every baseline runs where it exists, the plot
and report commands work (the README's table is the report of the committed results), the
plain-PyTorch and released baselines compute what they stand for, and failures become rows.

Timings are never asserted beyond being positive: benchmarks are not timed tests."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mgc_kernels as mk
from benchmarks import device, lightly_baselines, providers, released_mgc, report, runner
from benchmarks.cases import CASES, FWD, FWD_BWD, Case, Problem, Unavailable, variant
from benchmarks.measure import QUICK
from benchmarks.results import FIELDS

REPO = Path(__file__).resolve().parents[1]

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# the cases whose rows count matmul FLOPs or memory bytes
WORK_CASES = {
    "multigrain_pool",
    "info_nce_sparse",
    "geometric_info_nce",
    "info_nce_queue",
    "linear_soft_ce",
}
# (case, provider) of every baseline the cases declare
BASELINES = {
    ("sample_pairs", "released"),
    ("info_nce_sparse", "released"),
    ("loss_mgc", "released"),
    ("geometric_info_nce", "lightly"),
    ("info_nce_queue", "lightly"),
    ("linear_soft_ce", "lightly"),
    ("loss_smog", "lightly"),
    ("geometric_info_nce", "torch_attention"),
    ("info_nce_queue", "torch_attention"),
}


def run_module(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


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


def test_quick_without_out_leaves_the_committed_results_alone():
    before = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*.*")}
    proc = run_module("benchmarks", "--quick", "--case", "correspondence", "--provider", "torch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "results: not written (--quick)" in proc.stdout
    assert any(line.startswith("correspondence") for line in proc.stdout.splitlines())
    after = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*.*")}
    assert after == before


def test_quick_writes_the_same_rows_as_csv(quick):
    _, rows, out = quick
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == [r["case"] for r in rows]
    assert [json.loads(r["shapes"]) for r in table] == [r["shapes"] for r in rows]
    assert set(table[0]) == set(FIELDS)


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
            assert ((row["tflops"] or row["gbps"] or 0) > 0) == (row["case"] in WORK_CASES)
            assert row["fraction_of_peak"] is None  # no published peak for a CPU
        else:
            assert row["median_ms"] is None and len(row["status"]) > len("skipped: ")


def test_quick_covers_every_case_and_mode(quick):
    _, rows, _ = quick
    ran = {(r["case"], r["variant"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert ran == {
        (name, variant(size), mode)
        for name, case in CASES.items()
        for size in case.quick_sizes
        for mode in case.modes
    }


def test_quick_runs_every_baseline(quick):
    """Each baseline a case declares runs (lightly's where lightly is installed: CI installs
    the bench extra); everywhere else the row says why not."""
    _, rows, _ = quick
    ran = {
        (r["case"], r["provider"])
        for r in rows
        if r["provider"] in providers.BASELINES and r["status"] == "ok"
    }
    lightly_reason = lightly_baselines.unavailable()
    expected = {b for b in BASELINES if b[1] != "lightly" or lightly_reason is None}
    assert ran == expected
    for row in rows:
        if row["provider"] in providers.BASELINES and row["status"] != "ok":
            no_counterpart = f"skipped: {providers.BASELINES[row['provider']]}"
            assert row["status"] in (no_counterpart, f"skipped: {lightly_reason}"), row


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_writes_pngs(quick, tmp_path):
    _, rows, out = quick
    proc = run_module("benchmarks.plot", str(out), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    charts = {(r["case"], r["variant"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert len(list(tmp_path.glob("*.png"))) == len(charts)


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed")
def test_plot_says_matplotlib_is_missing(quick, tmp_path):
    _, _, out = quick
    proc = run_module("benchmarks.plot", str(out), "--out-dir", str(tmp_path))
    assert proc.returncode != 0 and "pip install matplotlib" in proc.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name", sorted(WORK_CASES))
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

    return Case("fake", "info_nce", build, (), (), ({"batch": 1},), (FWD,))


def wrapped_oom():
    """An OOM inside another error, as torch.compile re-raises it."""
    error = RuntimeError("compiled graph failed")
    error.__cause__ = torch.OutOfMemoryError("out of memory")
    return error


@pytest.mark.parametrize(
    "error, status",
    [
        (torch.OutOfMemoryError("out of memory"), "OOM"),
        (wrapped_oom(), "OOM"),
        (ValueError("bad input\nmore"), "error: ValueError: bad input"),
    ],
)
def test_failures_become_rows(error, status):
    target = device.target(torch.device("cpu"))
    rows = list(
        runner.run(
            fake_case(error),
            {"batch": 1},
            (FWD, FWD_BWD),
            ("torch", "naive"),
            torch.float32,
            target,
            QUICK,
        )
    )
    assert [(r["provider"], r["mode"]) for r in rows] == [("torch", FWD), ("naive", FWD)]
    assert rows[0]["status"] == status and rows[0]["median_ms"] is None
    assert rows[1]["status"].startswith("skipped: ")


def test_an_unavailable_case_is_skipped_rows():
    def build(batch, dtype, device):
        raise Unavailable("needs a package that is not installed")

    target = device.target(torch.device("cpu"))
    fake = Case("fake", "info_nce", build, (), (), ({"batch": 1},), (FWD, FWD_BWD))
    rows = list(
        runner.run(
            fake, {"batch": 1}, (FWD, FWD_BWD), ("torch", "released"), torch.float32, target, QUICK
        )
    )
    assert len(rows) == 4
    assert {r["status"] for r in rows} == {"skipped: needs a package that is not installed"}


def test_released_loss_is_the_plain_mean():
    """The released loss multiplies a mean cross-entropy by the pair weights over their sum:
    the weights cancel (docs/methods.md §1.6), leaving the unweighted InfoNCE."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(12, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    weights = torch.rand(12, generator=gen, dtype=torch.float64)
    released = released_mgc.contrastive_loss(q, k, weights, 0.1)
    torch.testing.assert_close(released, mk.info_nce(q, k, torch.arange(12), 0.1))


def test_released_mgc_loss_is_mgc_loss_uniform():
    """Where no image has padded pairs, the released loss path equals MGCLoss's default
    (``weighting="uniform"``) on the same rows."""
    boxes = [
        torch.tensor([[0.0, 0, 200, 200]] * 2),
        torch.tensor([False, True]),
        torch.tensor([[20.0, 10, 230, 240]] * 2),
        torch.tensor([True, False]),
    ]
    criterion = mk.MGCLoss()
    pairs = criterion.sample_pairs(*boxes)
    assert all(bool((p.weight > 0).all()) for p in pairs)
    gen = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (
        [torch.randn(2, k, 16, generator=gen, dtype=torch.float64) for k in criterion.num_pairs]
        for _ in range(4)
    )
    released = released_mgc.mgc_loss(q1, q2, k1, k2, *boxes)
    torch.testing.assert_close(released, criterion(q1, q2, k1, k2, pairs))


def test_report_tables_every_measurement(quick):
    _, rows, _ = quick
    text = report.markdown(report.latest(rows))
    measured = {(r["case"], r["variant"] or "-", str(r["shapes"]["B"]), r["mode"]) for r in rows}
    lines = {
        tuple(c.strip() for c in line.strip("|").split("|")[:4])
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert measured <= lines
    assert "MGC training step (micro, B=2, backend torch)" in text


def test_readme_table_is_the_report_of_the_committed_results():
    """The README's benchmark table is generated (``python -m benchmarks.report --readme
    README.md``), not typed: it must equal the report of benchmarks/results/*.jsonl."""
    files = report.default_files()
    assert files, "no committed results under benchmarks/results/"
    readme = (REPO / "README.md").read_text()
    expected = report.markdown(report.latest(report.load(files)))
    assert report.splice(readme, expected, "README.md") == readme


def test_report_needs_the_markers(tmp_path):
    with pytest.raises(SystemExit, match="benchmarks:begin"):
        report.splice("no markers here", "table", "README.md")


def test_device_peaks():
    h100 = "NVIDIA H100 80GB HBM3"
    assert device.slug(h100) == "nvidia-h100-80gb-hbm3"
    assert device.matmul_fraction(494.7, h100, torch.bfloat16) == pytest.approx(0.5)
    assert device.matmul_fraction(494.7, h100, torch.float32) is None  # no single fp32 peak
    assert device.memory_fraction(2400.0, "NVIDIA H200") == pytest.approx(0.5)
    assert device.memory_fraction(1000.0, "NVIDIA GeForce RTX 4090") is None
