"""The reference trainer end to end on CPU: every method, exact resume, timm export, DDP, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import mgc_kernels as mk  # noqa: E402
from _distributed import run_ranks  # noqa: E402
from _micro import micro_config, register_micro  # noqa: E402
from mgc_pretrain import cli  # noqa: E402
from mgc_pretrain.checkpoint import CheckpointError  # noqa: E402
from mgc_pretrain.methods import PRETRAIN_METHODS  # noqa: E402
from mgc_pretrain.train import NonFiniteLoss, Trainer, clip_per_parameter  # noqa: E402


def read_log(output: Path) -> list[dict]:
    with open(output / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def final_state(output: Path) -> dict:
    return torch.load(output / "last.pt", weights_only=True)


@pytest.mark.parametrize("method", PRETRAIN_METHODS)
def test_every_method_trains_and_changes_the_backbone(tmp_path, method):
    trainer = Trainer(micro_config(tmp_path, method=method, steps=3))
    before = {k: v.clone() for k, v in trainer.method.backbone.state_dict().items()}
    trainer.fit()
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    after = trainer.method.backbone.state_dict()
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert "blocks.0.attn.qkv.weight" in trained and "pos_embed" not in trained  # sin-cos fixed
    for _, momentum in trainer.method.momentum_pairs():  # EMA targets got no gradient
        assert all(not p.requires_grad and p.grad is None for p in momentum.parameters())
    assert final_state(tmp_path)["step"] == 3


@pytest.mark.parametrize("method", PRETRAIN_METHODS)
def test_resume_is_bit_exact(tmp_path, method):
    """N steps straight == N/2, a new process state from the checkpoint, N/2 more. The second
    half runs with a data-loader worker: the stream must not depend on the worker count."""
    options = dict(method=method, steps=4, smog_reset_every=3, save_every=100)
    Trainer(micro_config(tmp_path / "straight", **options)).fit()
    Trainer(micro_config(tmp_path / "split", **options)).fit(until=2)
    assert final_state(tmp_path / "split")["step"] == 2
    torch.manual_seed(12345)  # the resumed run must take its RNG state from the checkpoint
    Trainer(micro_config(tmp_path / "split", **options, resume="auto", workers=1)).fit()
    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["model"].keys() == split["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(tmp_path / "straight")] == [
        r["loss"] for r in read_log(tmp_path / "split")
    ]


def test_export_loads_in_timm_with_no_missing_or_unexpected_keys(tmp_path):
    trainer = Trainer(micro_config(tmp_path, steps=1))
    trainer.fit()
    info = json.loads((tmp_path / "backbone.json").read_text())
    path = str(tmp_path / "backbone.pth")
    via_overlay = timm.create_model(
        info["timm_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        **info["timm_kwargs"],
    )
    strict = timm.create_model(info["timm_name"], **info["timm_kwargs"])
    result = strict.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 56, 56)
    trained = trainer.method.backbone.eval()
    with torch.no_grad():
        expected = trained.forward_features(x)
        for model in (via_overlay, strict):
            assert torch.equal(model.eval().forward_features(x), expected)


def test_cli_runs_then_exports_and_evaluates(tmp_path, capsys):
    register_micro()
    out = tmp_path / "run"
    cli.main(
        ["--arch", "micro", "--steps", "2", "--workers", "0", "--output", str(out), "--no-eval"]
    )
    for name in (
        "last.pt",
        "backbone.pth",
        "backbone.json",
        "log.csv",
        "loss.png",
        "correspondences.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    cli.main(["export", str(out / "last.pt"), "--out", str(tmp_path / "again.pth")])
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            torch.load(out / "backbone.pth", weights_only=True).values(),
            torch.load(tmp_path / "again.pth", weights_only=True).values(),
        )
    )
    cli.main(["eval", str(out), "--num-train", "24", "--num-test", "16"])
    printed = capsys.readouterr().out
    assert "trained" in printed and "random init" in printed
    results = json.loads((out / "probes.json").read_text())
    assert set(results) == {"trained", "random init"}
    assert all(0 <= v["dense_miou"] <= 1 for v in results.values())


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = cli.train_parser()
    for action in parser._actions:
        if action.option_strings:
            assert action.help, action.option_strings
            assert action.option_strings[0] in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "simclr"], "--method: invalid choice"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--epochs", "two"], "--epochs takes a int"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_flags_and_data_exit_with_a_clear_message(tmp_path, capsys, argv, message):
    register_micro()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--arch", "micro", "--output", str(tmp_path), "--workers", "0", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_image_folder_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    register_micro()
    with pytest.raises(SystemExit):
        cli.main(
            [
                "--arch",
                "micro",
                "--data",
                str(tmp_path / "images"),
                "--output",
                str(tmp_path / "run"),
            ]
        )
    assert "no images" in capsys.readouterr().err.lower()


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 64"):
        Trainer(micro_config(tmp_path, batch_size=64, num_images=16))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    Trainer(micro_config(tmp_path / "mgc", steps=1)).fit()
    ckpt = tmp_path / "mgc" / "last.pt"
    with pytest.raises(CheckpointError, match="--method: checkpoint 'mgc', this run 'densecl'"):
        Trainer(micro_config(tmp_path / "other", method="densecl", resume=str(ckpt)))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        Trainer(micro_config(tmp_path / "x", resume=str(corrupt)))
    with pytest.raises(CheckpointError, match="not an mgc-pretrain training checkpoint"):
        Trainer(micro_config(tmp_path / "x", resume=str(tmp_path / "mgc" / "backbone.pth")))
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(micro_config(tmp_path / "x", resume=str(tmp_path / "missing.pt")))
    state = torch.load(ckpt, weights_only=True)
    state["model"].pop("projectors.0.0.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="projectors.0.0.weight"):
        Trainer(micro_config(tmp_path / "x", resume=str(tmp_path / "partial.pt")))


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    trainer = Trainer(micro_config(tmp_path, steps=4, save_every=1))
    forward = type(trainer.method).forward

    def poisoned(self, batch, epoch):
        loss, terms = forward(self, batch, epoch)
        return (loss * float("nan") if epoch * trainer.steps_per_epoch >= 2 else loss), terms

    monkeypatch.setattr(type(trainer.method), "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 2"):
        trainer.fit()
    assert final_state(tmp_path)["step"] == 2


def test_momentum_schedule_and_per_parameter_clip():
    assert mk.cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert mk.cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert mk.cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    big, small = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    clip_per_parameter([big, small], 1.0)
    assert big.grad.norm() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4]))  # below the bound: untouched


def _train_on_ranks(rank, world_size, output, method):
    register_micro()
    trainer = Trainer(micro_config(Path(output), method=method, steps=2))
    trainer.fit()
    return {
        "backbone": trainer.method.backbone.state_dict(),
        "buffers": dict(trainer.method.criterion.named_buffers()),
    }


@pytest.mark.parametrize("method", ["densecl", "mgc"])
def test_two_gloo_processes_train_in_step(tmp_path, method):
    """Two ranks x 4 images stay identical to each other; DenseCL (no BatchNorm in its heads)
    also matches one process over the same 8 images."""
    ranks = run_ranks(_train_on_ranks, 2, str(tmp_path / "ddp"), method, timeout=300)
    for key, value in ranks[0]["backbone"].items():
        assert torch.equal(value, ranks[1]["backbone"][key]), key
    for key, value in ranks[0]["buffers"].items():
        assert torch.equal(value, ranks[1]["buffers"][key]), key
    if method != "densecl":
        return
    single = Trainer(micro_config(tmp_path / "one", method=method, steps=2))
    initial = {k: v.clone() for k, v in single.method.backbone.state_dict().items()}
    single.fit()
    for key, value in single.method.backbone.state_dict().items():
        step = (value - initial[key]).abs().max()
        assert (ranks[0]["backbone"][key] - value).abs().max() <= 1e-3 * step + 1e-7, key


def test_views_are_a_function_of_seed_and_key_only():
    from mgc_kernels.transforms import TwoViewTransform
    from mgc_pretrain.data import SyntheticScenes
    from mgc_pretrain.loader import TwoViews

    scenes, transform = SyntheticScenes(8, 64), TwoViewTransform(56)
    a, again = TwoViews(scenes, transform, 0)[11], TwoViews(scenes, transform, 0)[11]
    assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(again[k])) for k in a)
    for other in (TwoViews(scenes, transform, 1)[11], TwoViews(scenes, transform, 0)[3]):
        # another seed, or the same image (11 % 8 == 3) in another epoch: other views
        assert not torch.equal(a["view1"], other["view1"])


def test_a_finished_run_can_be_extended(tmp_path):
    Trainer(micro_config(tmp_path, steps=2)).fit()
    longer = Trainer(micro_config(tmp_path, steps=4, resume="auto"))
    assert longer.start_step == 2
    longer.fit()
    assert [int(r["step"]) for r in read_log(tmp_path)] == [0, 1, 2, 3]
    assert final_state(tmp_path)["step"] == 4
