"""What a long run meets: Ctrl-C, SIGTERM, and kills at any moment (a checkpoint write
included). Each is run in a real child process, and every interrupted run must finish with
exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from _micro import register_micro  # noqa: E402
from mgc_pretrain import checkpoint, cli  # noqa: E402

TESTS = Path(__file__).resolve().parent
STEPS = 12
ARGS = ["--arch", "micro", "--steps", str(STEPS), "--save-every", "1", "--no-eval", "--seed", "3"]

# The child trains through the real command line. Its checkpoint writes are slowed (the bytes
# go out in eight flushed pieces) so that random kills often land inside one, and
# KILL_IN_SAVE=n kills it for certain halfway through its n-th write.
CHILD = """
import io, os, signal, sys, time
from _micro import register_micro
register_micro()
from mgc_pretrain import checkpoint, cli

kill_in = int(os.environ.get("KILL_IN_SAVE", "0"))
writes = []
torch_save = checkpoint.torch.save

def slow_save(obj, f):
    buffer = io.BytesIO()
    torch_save(obj, buffer)
    data = buffer.getvalue()
    writes.append(len(data))
    piece = len(data) // 8 + 1
    for start in range(0, len(data), piece):
        f.write(data[start:start + piece])
        f.flush()
        if len(writes) == kill_in and start > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)

checkpoint.torch.save = slow_save
cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def child_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("child") / "train.py"
    path.write_text(CHILD)
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The final checkpoint of the run that nothing interrupts."""
    register_micro()
    output = tmp_path_factory.mktemp("straight")
    cli.main([*ARGS, "--workers", "0", "--output", str(output / "run")])
    return torch.load(output / "run" / "last.pt", weights_only=True)


def start(script: Path, output: Path, *extra: str, **env: str) -> subprocess.Popen:
    """The trainer in its own process group (as a terminal runs it), resuming when the folder
    already holds a run."""
    resume = ["--resume"] if (output / "config.json").exists() else []
    # the child runs outside pytest: it finds _micro through PYTHONPATH
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(script), *ARGS, "--output", str(output), *resume, *extra],
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def logged_steps(output: Path) -> list[int]:
    if not (output / "log.csv").exists():
        return []
    with open(output / "log.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def wait_for_steps(child: subprocess.Popen, output: Path, count: int) -> None:
    deadline = time.monotonic() + 180
    while len(logged_steps(output)) < count:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child made no progress"
        time.sleep(0.05)


def assert_same_run(output: Path, straight: dict) -> None:
    final = torch.load(output / "last.pt", weights_only=True)
    assert final["step"] == STEPS
    for key, value in straight["model"].items():
        assert torch.equal(value, final["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), final["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_steps(output) == list(range(STEPS))  # every step logged once


def test_sigint_and_sigterm_save_the_step_and_exit_with_one_line(tmp_path, child_script, straight):
    output = tmp_path / "run"
    # Ctrl-C: SIGINT to the whole process group, data-loader workers included
    child = start(child_script, output, "--workers", "1")
    wait_for_steps(child, output, 2)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "SIGINT: saved" in err and "--resume" in err, err
    saved = checkpoint.read(output / "last.pt")["step"]
    assert saved == len(logged_steps(output)) >= 2  # the step in flight was kept
    # a scheduler's SIGTERM (Slurm, systemd: to every process of the job, workers included)
    child = start(child_script, output, "--workers", "1")
    wait_for_steps(child, output, saved + 2)
    os.killpg(child.pid, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM: saved" in err, err
    child = start(child_script, output, "--workers", "0")
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert_same_run(output, straight)


def test_kills_at_random_moments_resume_to_the_same_weights(tmp_path, child_script, straight):
    output = tmp_path / "run"
    child = start(child_script, output, "--workers", "0", KILL_IN_SAVE="3")
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert checkpoint.read(output / "last.pt")["step"] == 2  # the torn third write is not it
    assert list(output.glob(".last.pt.tmp-*"))  # (its remains are still there)
    rng = random.Random(0)
    for _ in range(3):
        child = start(child_script, output, "--workers", "0")
        time.sleep(rng.uniform(2.0, 8.0))
        child.kill()
        child.communicate()
        checkpoint.read(output / "last.pt")  # whatever the moment, the checkpoint is whole
    child = start(child_script, output, "--workers", "0")
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert not list(output.glob(".last.pt.tmp-*"))
    assert_same_run(output, straight)
