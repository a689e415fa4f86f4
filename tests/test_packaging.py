"""The package's metadata and what a partial install says: the version lives in one place, the
console script without the ``train`` extra names the extra instead of a traceback, and setup.py
puts the native sources into the wheel. (``.ci/wheel`` checks the built wheel itself, installed
in a fresh environment.)"""

import subprocess
import sys
from pathlib import Path

import tomllib

import mgc_kernels as mk

REPO = Path(__file__).resolve().parents[1]


def test_the_version_lives_in_one_place():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    import mgc_pretrain

    assert mgc_pretrain.__version__ == mk.__version__


def test_mgc_pretrain_without_the_train_extra_names_it():
    blocked = "import sys; sys.modules['timm'] = None; from mgc_pretrain.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", blocked, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'mgc_kernels[train]'" in proc.stderr and "timm" in proc.stderr


def test_build_py_copies_csrc_into_the_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    copied = sorted(
        p.relative_to(tmp_path / "mgc_kernels" / "csrc").as_posix()
        for p in (tmp_path / "mgc_kernels" / "csrc").rglob("*")
        if p.is_file()
    )
    assert copied == sorted(
        p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file()
    )
    assert (tmp_path / "mgc_pretrain" / "cli.py").is_file()
    assert not (REPO / "mgc_kernels" / "csrc").exists()  # the checkout keeps csrc/ at the top
