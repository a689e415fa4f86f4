"""The command line around a run: folders, saved settings, resuming and extending, backends,
real image folders, ResNet-50, and the messages a user sees when something is off."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("timm")

import mgc_kernels as mk  # noqa: E402
from _micro import micro_config, register_micro  # noqa: E402
from mgc_pretrain import cli  # noqa: E402
from mgc_pretrain.methods import methods_for  # noqa: E402
from mgc_pretrain.train import Schedule, Trainer  # noqa: E402

MICRO = ["--arch", "micro", "--workers", "0", "--no-eval"]


def train(capsys, *argv) -> str:
    register_micro()
    cli.main([*MICRO, *argv])
    return capsys.readouterr().err


def refused(capsys, *argv, command=()) -> str:
    register_micro()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, *MICRO, *argv] if not command else [*command, *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def log_rows(output) -> list[dict]:
    with open(output / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_of(output) -> int:
    return torch.load(output / "last.pt", weights_only=True)["step"]


def test_a_second_run_into_a_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "2", "--output", str(out))
    before = (out / "last.pt").read_bytes()
    err = refused(capsys, "--steps", "3", "--output", str(out))
    assert "already holds a run" in err and "--resume" in err and "--output" in err
    assert (out / "last.pt").read_bytes() == before and len(log_rows(out)) == 2


def test_resume_takes_the_saved_settings_and_names_what_changed(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "2", "--lr", "0.002", "--batch-size", "4", "--output", str(out))
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.002 and saved["batch_size"] == 4 and saved["steps"] == 2
    err = train(capsys, "--resume", str(out), "--steps", "3", "--save-minutes", "5")
    assert "changed: --steps 2 -> 3, --save-minutes 10.0 -> 5.0" in err
    resumed = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in resumed.items() if k not in ("steps", "save_minutes", "resume")} == {
        k: v for k, v in saved.items() if k not in ("steps", "save_minutes", "resume")
    }
    assert step_of(out) == 3 and [int(r["step"]) for r in log_rows(out)] == [0, 1, 2]


def test_resume_refuses_what_would_change_the_run_or_go_backwards(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "3", "--output", str(out))
    err = refused(capsys, "--resume", "--output", str(out), "--lr", "0.5")
    assert "--lr (the run has 0.004, this command 0.5) cannot change" in err
    err = refused(capsys, "--resume", "--output", str(out), "--steps", "2")
    assert "at step 3, past this run's last step 2" in err
    err = refused(capsys, "--resume", "--output", str(tmp_path / "empty"))
    assert "holds no run to resume" in err
    assert step_of(out) == 3


def test_resuming_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "2", "--output", str(out))
    err = train(capsys, "--resume", "--output", str(out))
    assert "already at its last step, 2: nothing to train" in err
    assert step_of(out) == 2 and len(log_rows(out)) == 2


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "2", "--output", str(out))
    (out / "last.pt").unlink()
    err = train(capsys, "--resume", "--output", str(out))
    assert "from step 0" in err and step_of(out) == 2


def test_a_new_length_retimes_the_rest_of_the_schedules():
    schedule = Schedule.straight(100)
    assert [schedule.position(s) for s in (0, 40, 100, 130)] == [0, 40, 100, 100]
    longer = schedule.retimed(40, 200)  # 60 scheduled steps left, stretched over 160
    assert longer.position(40) == 40 and longer.position(200) == 100
    assert longer.position(120) == pytest.approx(40 + 60 * 80 / 160)
    assert longer.retimed(120, 200) is longer  # a resume that keeps the length changes nothing
    finished = schedule.retimed(100, 150)  # a finished run stays at the end
    assert finished.position(100) == finished.position(150) == 100
    assert mk.cosine_momentum(finished.position(120), finished.length, 0.996) == 1


def test_extending_a_run_continues_its_lr_and_momentum_without_a_jump(tmp_path):
    Trainer(micro_config(tmp_path / "short", steps=4, warmup_epochs=0)).fit()
    Trainer(micro_config(tmp_path / "long", steps=4, warmup_epochs=0)).fit(until=2)
    Trainer(micro_config(tmp_path / "long", steps=8, warmup_epochs=0, resume="auto")).fit()
    short, long = log_rows(tmp_path / "short"), log_rows(tmp_path / "long")
    same = ("loss", "lr", "momentum")
    assert [[r[k] for k in same] for r in short[:2]] == [[r[k] for k in same] for r in long[:2]]
    lrs = [float(r["lr"]) for r in long]
    momenta = [float(r["momentum"]) for r in long]
    assert lrs[2] == pytest.approx(float(short[2]["lr"]))  # where the short run was at step 2
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))  # then down, smoothly, to the end
    assert all(a < b for a, b in zip(momenta[1:], momenta[2:]))
    assert float(long[-1]["momentum"]) < 1 and lrs[-1] > 0


def test_help_and_steps_zero(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "0", "--epochs", "1", "--batch-size", "16", "--output", str(out))
    assert step_of(out) == 2  # 32 images / 16: --steps 0 means --epochs


def test_short_runs_do_not_print_timms_one_step_cosine_warning(tmp_path, caplog):
    from timm.scheduler import CosineLRScheduler

    with caplog.at_level(logging.WARNING):
        CosineLRScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), t_initial=1)
    assert "no effect" in caplog.text  # what timm says for a one-step cosine ...
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(micro_config(tmp_path, steps=2))  # 1 warm-up step + a one-step cosine
    assert "no effect" not in caplog.text  # ... and the trainer keeps quiet about


def test_backends_that_cannot_run_are_refused_at_start(tmp_path, capsys, monkeypatch):
    err = refused(capsys, "--backend", "native", "--output", str(tmp_path / "a"))
    assert "invalid choice: 'native'" in err
    monkeypatch.setattr(mk.backends, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = refused(capsys, "--backend", "triton", "--output", str(tmp_path / "b"))
    assert "--backend triton cannot run here" in err and "CPU" in err
    assert not (tmp_path / "b").exists()


def test_eval_takes_a_run_folder_an_export_or_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "--steps", "1", "--output", str(out))
    tables = []
    for target in (out / "last.pt", out, out / "backbone.pth"):
        cli.main(["eval", str(target), "--num-train", "16", "--num-test", "8"])
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] == tables[2] and "random init" in tables[0]
    err = refused(capsys, str(tmp_path / "nothing.pt"), command=["eval"])
    assert "does not exist" in err


def _labelled_folder(root, bad: bool = False) -> None:
    """Two classes of noisy solid colours; with ``bad``, a text file named .jpg and a
    truncated JPEG among them."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (64, 64, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.jpg")
    if bad:
        (root / "red" / "notes.jpg").write_text("not an image")
        whole = (root / "blue" / "3.jpg").read_bytes()
        (root / "blue" / "3.jpg").write_bytes(whole[: len(whole) // 2])


def test_an_image_folder_with_bad_files_trains_and_counts_them(tmp_path, capsys):
    _labelled_folder(tmp_path / "images", bad=True)
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as warned:
        train(
            capsys,
            "--data",
            str(tmp_path / "images"),
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--output",
            str(out),
        )
    messages = " ".join(str(w.message) for w in warned)
    assert "notes.jpg" in messages and "3.jpg" in messages
    rows = log_rows(out)
    assert len(rows) == 2 and sum(int(r["bad_images"]) for r in rows) == 1
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_eval_and_end_of_run_probes_on_a_labelled_folder(tmp_path, capsys):
    _labelled_folder(tmp_path / "labelled")
    out = tmp_path / "run"
    register_micro()
    cli.main(
        [
            "--arch",
            "micro",
            "--workers",
            "0",
            "--steps",
            "1",
            "--output",
            str(out),
            "--probe-data",
            str(tmp_path / "labelled"),
        ]
    )
    printed = capsys.readouterr().out
    assert f"k-NN probe on {tmp_path / 'labelled'}" in printed
    results = json.loads((out / "probes.json").read_text())
    assert set(results) == {"trained", "random init"}
    assert all(0 <= r["knn_top1"] <= 1 and r["num_classes"] == 2 for r in results.values())


@pytest.mark.parametrize("method", methods_for("cnn"))
def test_resnet50_trains_every_method_it_is_offered(tmp_path, capsys, method):
    out = tmp_path / method
    cli.main(
        [
            "--arch",
            "resnet50",
            "--method",
            method,
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--num-images",
            "4",
            "--source-size",
            "240",
            "--workers",
            "0",
            "--no-eval",
            "--queue-size",
            "64",
            "--num-groups",
            "8",
            "--bank-size",
            "16",
            "--output",
            str(out),
        ]
    )
    rows = log_rows(out)
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    info = json.loads((out / "backbone.json").read_text())
    assert info["timm_name"] == "resnet50"
    model = __import__("timm").create_model(info["timm_name"], **info["timm_kwargs"])
    model.load_state_dict(torch.load(out / "backbone.pth", weights_only=True), strict=True)


@pytest.mark.parametrize("method", sorted(set(methods_for("vit")) - set(methods_for("cnn"))))
def test_resnet50_refuses_the_vit_methods(tmp_path, capsys, method):
    err = refused(
        capsys, "--method", method, "--output", str(tmp_path), command=["--arch", "resnet50"]
    )
    assert f"--method {method} is not offered with --arch resnet50" in err


def test_an_ema_momentum_above_one_is_refused(tmp_path, capsys):
    err = refused(capsys, "--momentum", "1.5", "--output", str(tmp_path))
    assert "--momentum must be in [0, 1]" in err and "1.5" in err


@pytest.mark.parametrize("minutes, saved_after", [(1e-9, [1, 2, 3]), (0, [3])])
def test_checkpoints_also_come_every_few_minutes(tmp_path, monkeypatch, minutes, saved_after):
    trainer = Trainer(micro_config(tmp_path, steps=3, save_every=100, save_minutes=minutes))
    saved = []
    monkeypatch.setattr(trainer, "save", saved.append)
    trainer.fit()
    assert saved == saved_after


def test_a_checkpoint_from_before_saved_schedules_resumes_as_a_straight_run(tmp_path):
    Trainer(micro_config(tmp_path, steps=2)).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["schedule"]
    torch.save(state, tmp_path / "last.pt")
    longer = Trainer(micro_config(tmp_path, steps=4, resume="auto"))
    assert longer.schedule.knots == [(0, 0.0), (2, 2.0), (4, 2.0)]


def test_a_log_row_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    Trainer(micro_config(tmp_path, steps=3)).fit(until=2)
    with open(tmp_path / "log.csv", "a") as f:
        f.write("2,0.25,13.1")  # killed while writing step 2's row ...
    with open(tmp_path / "log.csv", "a") as f:
        f.write("\n1")  # ... or with only part of a step number written
    Trainer(micro_config(tmp_path, steps=3, resume="auto")).fit()
    assert [int(r["step"]) for r in log_rows(tmp_path)] == [0, 1, 2]
    assert all(None not in r.values() for r in log_rows(tmp_path))
