"""``backbone.pth``: the online ViT in plain timm key names, with a JSON note of how to build it.

Load it with timm (no missing or unexpected keys)::

    model = timm.create_model(info["timm_name"], **info["timm_kwargs"], pretrained=True,
                              pretrained_cfg_overlay=dict(file="backbone.pth"))
    # or: model = timm.create_model(info["timm_name"], **info["timm_kwargs"])
    #     model.load_state_dict(torch.load("backbone.pth", weights_only=True), strict=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from torch import nn

from .checkpoint import CheckpointError, save_atomic
from .models import Arch


def export_backbone(backbone: nn.Module, arch: Arch, path: str | os.PathLike) -> Path:
    """Write ``backbone.state_dict()`` (CPU tensors, timm's own keys: no prefix to strip) to
    ``path`` and ``{timm_name, timm_kwargs, arch}`` to the ``.json`` beside it."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    save_atomic(state, path)
    info = {"timm_name": arch.timm_name, "timm_kwargs": arch.timm_kwargs(), "arch": arch.as_dict()}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_backbone(path: str | os.PathLike) -> tuple[nn.Module, Arch]:
    """The exported backbone rebuilt by timm from its JSON note, loaded strictly."""
    path = Path(path)
    note = path.with_suffix(".json")
    if not path.is_file() or not note.is_file():
        raise CheckpointError(
            f"backbone export {str(path)!r} needs both the .pth and its "
            f"{note.name}; found .pth: {path.is_file()}, .json: {note.is_file()}"
        )
    info = json.loads(note.read_text())
    arch = Arch(**info["arch"])
    model = timm.create_model(info["timm_name"], pretrained=False, **info["timm_kwargs"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise CheckpointError(
            f"backbone export {str(path)!r} cannot be loaded into "
            f"{info['timm_name']}: {type(e).__name__}: {e}"
        ) from e
    return model, arch
