"""The three commands: train (then figures and probes), eval, export."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import default_collate

import mgc_kernels as mk
from mgc_kernels.transforms import TwoViewTransform

from . import checkpoint
from .config import RESUMABLE_CHANGES, Config, read_json, write_json
from .data import SyntheticScenes
from .export import export_backbone, load_backbone
from .figures import draw_method_figure
from .loader import TwoViews
from .models import Arch, create_backbone
from .plots import plot_loss_curve
from .probes import format_table, probe_backbone, probe_image_folder
from .train import Trainer


def train_command(typed: dict) -> None:
    """``mgc-pretrain [flags]``: the run's settings from the flags given (``typed``), or from
    the saved run they resume; then :func:`train`."""
    cfg = resumed_config(typed) if "resume" in typed else new_config(typed)
    check_backend(cfg)
    train(cfg)


def new_config(typed: dict) -> Config:
    """A new run's settings; its folder must not hold another run."""
    cfg = Config(**typed).with_preset()
    output = Path(cfg.output)
    held = [name for name in ("last.pt", "config.json") if (output / name).exists()]
    if held:
        raise ValueError(
            f"--output {output} already holds a run ({', '.join(held)}): continue "
            f"it with --resume, or start a new run with another --output"
        )
    return cfg


def resumed_config(typed: dict) -> Config:
    """The saved settings of the run to resume, with the flags that may change on resume
    applied (and named); any other flag that differs is refused."""
    output, target = _resume_target(typed)
    saved = _saved_settings(output, target)
    refused = [
        f"--{k.replace('_', '-')} (the run has {getattr(saved, k)!r}, this command {v!r})"
        for k, v in typed.items()
        if k not in RESUMABLE_CHANGES and getattr(saved, k) != v
    ]
    if refused:
        raise ValueError(
            f"{', '.join(refused)} cannot change when resuming {output}: it shapes "
            "the model, the data or the optimisation; start a new run with "
            "another --output for that"
        )
    changed = {
        k: v
        for k, v in typed.items()
        if k in RESUMABLE_CHANGES and k not in ("resume", "output") and getattr(saved, k) != v
    }
    cfg = Config.from_dict(
        {
            **saved.as_dict(),
            **changed,
            "output": str(output),
            "resume": str(target) if target.is_file() else "",
        }
    )
    if "epochs" in typed and "steps" not in typed:
        cfg.steps = 0  # a new --epochs sets the length, even if the run was given --steps
    cfg.with_preset()
    notes = [f"--{k.replace('_', '-')} {getattr(saved, k)} -> {v}" for k, v in changed.items()]
    start = f"from {target}" if target.is_file() else "from step 0 (no checkpoint was saved yet)"
    print(
        f"mgc-pretrain: resuming {output} {start} with its saved settings"
        + (f"; changed: {', '.join(notes)}" if notes else ""),
        file=sys.stderr,
    )
    return cfg


def _resume_target(typed: dict) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` of ``--resume [PATH]`` and ``--output``."""
    if typed["resume"] != "auto":
        path = Path(typed["resume"])
        target = path / "last.pt" if path.is_dir() else path
        return Path(typed.get("output", target.parent)), target
    if "output" in typed:
        output = Path(typed["output"])
    else:
        output = Path(f"runs/{typed.get('method', Config.method)}-{typed.get('arch', Config.arch)}")
    return output, output / "last.pt"


def _saved_settings(output: Path, target: Path) -> Config:
    if (output / "config.json").is_file():
        return read_json(output / "config.json")
    if target.is_file():  # a run from before config.json, or a checkpoint copied elsewhere
        return Config.from_dict(checkpoint.read(target)["config"])
    raise ValueError(
        f"--resume: {output} holds no run to resume (no config.json, no "
        f"{target.name}); start one without --resume"
    )


def check_backend(cfg: Config) -> None:
    """Refuse at start a backend that cannot run on this run's device."""
    if cfg.backend != "triton":
        return
    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    loads, why = mk.backends.backend_status("triton")
    if on_cpu and not mk.backends.interpreting():
        why, loads = "it runs on CUDA devices and this run is on the CPU", False
    if not loads:
        raise ValueError(f"--backend triton cannot run here: {why}; use --backend auto or torch")


def train(cfg: Config) -> None:
    """Train, then (rank 0) draw the figures and, with ``cfg.eval``, run the probes."""
    trainer = Trainer(cfg)
    try:
        if trainer.dist.is_main:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            write_json(cfg, Path(cfg.output) / "config.json")
            if trainer.start_step == trainer.total_steps:
                print(
                    f"mgc-pretrain: {cfg.output} is already at its last step, "
                    f"{trainer.total_steps}: nothing to train (a larger --steps or --epochs "
                    "extends it); writing its backbone, figures and probes again",
                    file=sys.stderr,
                )
        trainer.fit()
    finally:
        trainer.dist.close()
    if not trainer.dist.is_main:
        return
    output = Path(cfg.output)
    draw_loss(output / "log.csv", output / "loss.png", f"{cfg.method} on {cfg.data}")
    draw_method_figure(trainer.method, first_batch(trainer), output / "correspondences.png")
    print(
        f"mgc-pretrain: wrote {output}/last.pt, config.json, backbone.pth (+ .json), "
        "log.csv, tb/, loss.png, correspondences.png"
    )
    if cfg.eval:
        evaluate(
            output / "backbone.pth",
            device=str(trainer.dist.device),
            seed=cfg.seed + 1,
            data=cfg.probe_data,
        )


def draw_loss(log: Path, png: Path, title: str) -> None:
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    plot_loss_curve(
        [int(r["step"]) for r in rows],
        [float(r["loss"]) for r in rows],
        png,
        title=title,
        lrs=[float(r["lr"]) for r in rows],
    )


def first_batch(trainer: Trainer, most: int = 64) -> dict:
    """The first samples of the training stream, a batch's worth up to ``most`` (what the
    figure shows the method do: SMoG's groups and MCL's 7 x 7 montages want many images)."""
    views = TwoViews(
        trainer.dataset,
        TwoViewTransform(trainer.cfg.architecture.img_size),
        trainer.cfg.seed,
        trainer.method.level_ratios,
    )
    size = min(trainer.cfg.batch_size, most, len(views))
    return default_collate([views[i] for i in range(size)])


def evaluate(
    backbone: str | Path,
    *,
    num_train: int = 1024,
    num_test: int = 512,
    source_size: int = 0,
    seed: int = 1,
    device: str = "auto",
    data: str = "",
) -> dict:
    """Probe a trained backbone and a random one of the same architecture, print and save the
    table: on held-out synthetic scenes (fit on seed ``seed``, scored on ``seed + 1``), or with
    ``data``, by k-NN on a labelled image folder."""
    path = Path(backbone)
    model, arch = trained_backbone(path)
    torch.manual_seed(seed)
    random_model = create_backbone(arch)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    models = (("trained", model), ("random init", random_model))
    if data:
        results = {
            name: probe_image_folder(m.to(device), data, image_size=arch.img_size, device=device)
            for name, m in models
        }
        print(f"k-NN probe on {data}:")
    else:
        size = source_size or arch.img_size
        fit = SyntheticScenes(num_train, size, seed)
        test = SyntheticScenes(num_test, size, seed + 1)
        results = {
            name: probe_backbone(
                m.to(device),
                fit,
                test,
                image_size=arch.img_size,
                grid=arch.grid,
                num_classes=SyntheticScenes.NUM_CLASSES,
                device=device,
            )
            for name, m in models
        }
        print(
            f"Probes on {num_test} held-out synthetic scenes ({num_train} to fit), "
            f"{arch.img_size} px:"
        )
    print(format_table(results))
    folder = path if path.is_dir() else path.parent
    (folder / "probes.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def trained_backbone(path: Path) -> tuple[torch.nn.Module, Arch]:
    """The backbone of a run folder (its ``backbone.pth``, else its ``last.pt``), of a
    ``backbone.pth`` export, or of a training checkpoint."""
    if path.is_dir():
        path = path / "backbone.pth" if (path / "backbone.pth").is_file() else path / "last.pt"
    if path.with_suffix(".json").is_file():
        return load_backbone(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: give a run folder, a "
            "backbone.pth export or a training checkpoint (last.pt)"
        )
    return checkpoint_backbone(path)


def checkpoint_backbone(ckpt_path: str | Path) -> tuple[torch.nn.Module, Arch]:
    """The online backbone of a training checkpoint, loaded strictly."""
    ckpt = checkpoint.read(ckpt_path)
    arch = Config.from_dict(ckpt["config"]).architecture
    backbone = create_backbone(arch)
    prefix = "backbone."
    state = {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    checkpoint.load_state(backbone, state, "backbone", ckpt_path)
    return backbone, arch


def export(ckpt_path: str | Path, out: str | Path) -> None:
    """``backbone.pth`` from the online backbone of a training checkpoint."""
    backbone, arch = checkpoint_backbone(ckpt_path)
    print(f"mgc-pretrain: wrote {export_backbone(backbone, arch, out)}")
