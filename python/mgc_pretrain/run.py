"""The three commands: train (then figures and probes), eval, export."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

import mgc_kernels as mk
from mgc_kernels.transforms import TwoViewTransform

from . import checkpoint
from .config import Config
from .data import SyntheticScenes
from .export import export_backbone, load_backbone
from .loader import TwoViews
from .models import create_backbone
from .plots import plot_correspondences, plot_loss_curve
from .probes import format_table, probe_backbone
from .train import Trainer


def train(cfg: Config) -> None:
    """Train, then (rank 0) draw the figures and, with ``cfg.eval``, run the probes."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.dist.close()
    if not trainer.dist.is_main:
        return
    output = Path(cfg.output)
    draw_loss(output / "log.csv", output / "loss.png", f"{cfg.method} on {cfg.data}")
    draw_pairs(trainer.dataset, cfg, output / "correspondences.png")
    print(f"mgc-pretrain: wrote {output}/last.pt, backbone.pth (+ .json), log.csv, tb/, "
          "loss.png, correspondences.png")
    if cfg.eval:
        evaluate(output / "backbone.pth", device=str(trainer.dist.device), seed=cfg.seed + 1)


def draw_loss(log: Path, png: Path, title: str) -> None:
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    plot_loss_curve([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], png,
                    title=title, lrs=[float(r["lr"]) for r in rows])


def draw_pairs(dataset, cfg: Config, png: Path, cell: int = 2, k: int = 10) -> None:
    """The first image's two views with the MGC pairs sampled at ``cell`` (the paper's
    localisation figure): what the loss contrasts, drawn from the same ops."""
    arch = cfg.architecture
    views = TwoViews(dataset, TwoViewTransform(arch.img_size), cfg.seed)[0]
    geometry = [views[name][None] if torch.is_tensor(views[name]) else torch.tensor([views[name]])
                for name in ("box1", "flip1", "box2", "flip2")]
    pairs = mk.sample_pairs(*geometry, grid=arch.grid, cell=cell, k=k)
    plot_correspondences(views["view1"], views["view2"], pairs.idx1[0], pairs.idx2[0],
                         pairs.weight[0], grid=arch.grid, cell=cell, path=png,
                         title=f"MGC pairs at cell {cell} (top {k} by overlap)")


def evaluate(backbone: str | Path, *, num_train: int = 1024, num_test: int = 512,
             source_size: int = 0, seed: int = 1, device: str = "auto") -> dict:
    """Probe an exported backbone and a random one of the same architecture on held-out
    synthetic scenes (fit on seed ``seed``, scored on ``seed + 1``); print and save the table."""
    path = Path(backbone)
    if path.is_dir():
        path = path / "backbone.pth"
    model, arch = load_backbone(path)
    torch.manual_seed(seed)
    random_model = create_backbone(arch)
    size = source_size or arch.img_size
    fit = SyntheticScenes(num_train, size, seed)
    test = SyntheticScenes(num_test, size, seed + 1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = {name: probe_backbone(m.to(device), fit, test, image_size=arch.img_size,
                                    grid=arch.grid, num_classes=SyntheticScenes.NUM_CLASSES,
                                    device=device)
               for name, m in (("trained", model), ("random init", random_model))}
    print(f"Probes on {num_test} held-out synthetic scenes ({num_train} to fit), "
          f"{arch.img_size} px:")
    print(format_table(results))
    (path.parent / "probes.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def export(ckpt_path: str | Path, out: str | Path) -> None:
    """``backbone.pth`` from the online backbone of a training checkpoint."""
    ckpt = checkpoint.read(ckpt_path)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in Config.field_names()})
    arch = cfg.architecture
    backbone = create_backbone(arch)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    checkpoint.load_state(backbone, state, "backbone", ckpt_path)
    print(f"mgc-pretrain: wrote {export_backbone(backbone, arch, out)}")
