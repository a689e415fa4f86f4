"""Checkpoints: written atomically, read with ``weights_only=True``, checked before any use."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "mgc_pretrain/1"
KEYS = ("format", "config", "step", "model", "optimizer", "scaler", "rng")
_TEMPORARY_PREFIX = ".{}.tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is not ours, or does not fit this run."""


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: a crash mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TEMPORARY_PREFIX.format(path.name)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete what a process killed mid-write left beside ``path`` (its ``path`` is intact)."""
    path = Path(path)
    for stale in path.parent.glob(f"{_TEMPORARY_PREFIX.format(path.name)}*"):
        stale.unlink(missing_ok=True)


def read(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """A training checkpoint, with its format and keys checked (not yet against the run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # any unpickling/zip error: the file is damaged or not a checkpoint
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is damaged or not "
            f"a torch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{str(path)!r} is not an mgc-pretrain training checkpoint "
            f"(format {found!r}, expected {FORMAT!r}); backbone exports are "
            "loaded with timm, not resumed"
        )
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    return ckpt


def check_compatible(ckpt_config: dict, config: dict, fields: tuple[str, ...], path) -> None:
    """Refuse to resume into a run that differs in anything that shapes the state."""
    differences = [
        f"--{name.replace('_', '-')}: checkpoint {ckpt_config.get(name)!r}, this run "
        f"{config[name]!r}"
        for name in fields
        if ckpt_config.get(name) != config[name]
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this run: " + "; ".join(differences)
        )


def load_state(module: torch.nn.Module, state: dict, what: str, path) -> None:
    """``load_state_dict(strict=True)`` with the reason turned into a :class:`CheckpointError`:
    a partial load would silently train from half-random weights."""
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its {what} does not fit this run: {e}"
        ) from e
