"""Run configuration: one dataclass, filled from the command line over a per-architecture preset,
written to ``config.json`` in the run folder and restored from there by ``--resume``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .methods import methods_for
from .models import ARCHS, Arch

# Per-architecture defaults of the fields left at None. "vit_s16" is MGC's published recipe;
# "tiny" is sized so the whole default run, evaluation included, takes minutes on a 2-core CPU
# (its short schedule takes a higher lr, 4e-3 per 256 images: measured better on the dense probe
# than 1e-3 in the same 128 steps); "resnet50" is MoCo v2's recipe (SGD, lr 0.03 per 256, weight
# decay 1e-4, cosine, no clipping), on which DenseCL builds.
_VIT = dict(optimizer="adamw", weight_decay=0.05, clip=3.0, momentum=0.996, min_lr=1e-6)
PRESETS: dict[str, dict] = {
    "vit_s16": dict(
        _VIT,
        batch_size=256,
        epochs=800,
        lr=1e-3,
        warmup_epochs=10,
        drop_path=0.05,
        num_images=100_000,
        source_size=256,
        queue_size=65536,
        num_groups=3000,
        num_prototypes=65536,
        bank_size=65536,
    ),
    "tiny": dict(
        _VIT,
        batch_size=64,
        epochs=4,
        lr=4e-3,
        warmup_epochs=1,
        drop_path=0.0,
        num_images=2048,
        source_size=128,
        queue_size=4096,
        num_groups=64,
        num_prototypes=1024,
        bank_size=1024,
    ),
    "resnet50": dict(
        optimizer="sgd",
        weight_decay=1e-4,
        clip=0.0,
        momentum=0.999,
        min_lr=0.0,
        batch_size=256,
        epochs=200,
        lr=0.03,
        warmup_epochs=0,
        drop_path=0.0,
        num_images=100_000,
        source_size=256,
        queue_size=65536,
        num_groups=3000,
        num_prototypes=65536,
        bank_size=65536,
    ),
}

# What a resumed run may change: where and how it runs, how often it saves, its length (the
# schedules are re-timed, see Trainer) and the evaluation. Everything else shapes the model, its
# state, the data stream or the optimisation, and is fixed by the run's first start.
RESUMABLE_CHANGES = (
    "output",
    "resume",
    "steps",
    "epochs",
    "device",
    "backend",
    "workers",
    "amp",
    "save_every",
    "save_minutes",
    "eval",
    "probe_data",
)


@dataclass
class Config:
    method: str = "mgc"
    arch: str = "tiny"
    data: str = "synthetic"
    output: str = ""
    num_images: int | None = None
    source_size: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    steps: int = 0  # 0: epochs * steps per epoch
    warmup_epochs: float | None = None
    optimizer: str | None = None  # "adamw" or "sgd" (momentum 0.9)
    lr: float | None = None  # per 256 images; scaled by batch_size / 256
    min_lr: float | None = None
    weight_decay: float | None = None
    clip: float | None = None
    momentum: float | None = None  # EMA momentum at step 0
    drop_path: float | None = None
    amp: str = "auto"
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    resume: str = ""
    save_every: int = 0  # 0: once per epoch
    save_minutes: float = 10.0  # 0: off
    eval: bool | None = None  # None: after training on the synthetic data
    probe_data: str = ""  # a labelled image folder for the end-of-run k-NN probe
    mgc_mode: str = "sparse"
    mgc_weighting: str = "uniform"
    queue_size: int | None = None
    num_groups: int | None = None
    bank_size: int | None = None
    smog_reset_every: int = 300
    num_prototypes: int | None = None
    num_queries: int = 10

    @property
    def architecture(self) -> Arch:
        return ARCHS[self.arch]

    def with_preset(self) -> Config:
        """Fill the fields left at None from the architecture's preset, then check the run."""
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {tuple(ARCHS)}, got {self.arch!r}")
        for name, value in PRESETS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not self.output:
            self.output = f"runs/{self.method}-{self.arch}"
        if self.eval is None:
            self.eval = self.data == "synthetic" or bool(self.probe_data)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(
                f"--momentum must be in [0, 1] (the EMA momentum at step 0), got {self.momentum}"
            )
        offered = methods_for(self.architecture.family)
        if self.method not in offered:
            raise ValueError(
                f"--method {self.method} is not offered with --arch {self.arch}; "
                f"it trains {', '.join(offered)}"
            )
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, saved: dict) -> Config:
        """A config saved by any version: unknown keys dropped, missing ones at their default."""
        return cls(**{k: v for k, v in saved.items() if k in cls.field_names()})


def write_json(cfg: Config, path: Path) -> None:
    """Written beside and renamed over ``path``: a kill meanwhile leaves the old settings."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Config:
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{str(path)!r} cannot be read as a run's settings: {e}") from e
