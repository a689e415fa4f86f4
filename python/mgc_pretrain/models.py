"""Backbones (timm ViTs and ResNets) and their widths; the heads on top are
:mod:`mgc_kernels.heads`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn


@dataclass(frozen=True)
class Arch:
    """A timm backbone and the width of the heads on top of it.

    ``timm_name`` with ``timm_kwargs()`` is exactly what ``timm.create_model`` needs to rebuild
    the exported backbone (``backbone.json`` records both). ``family`` is ``"vit"`` (tokens are
    the patch tokens, the global feature is the CLS token) or ``"cnn"`` (tokens are the positions
    of the last feature map, whose stride is ``patch_size``; the global feature is their mean).
    """

    timm_name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    head_hidden: int  # hidden width of projectors and predictors (4096 in MGC)
    head_dim: int  # output width D of the projections (128 in MGC)
    family: str = "vit"

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def timm_kwargs(self) -> dict:
        if self.family == "cnn":
            return dict(num_classes=0)
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            qkv_bias=True,
            num_classes=0,
        )

    def as_dict(self) -> dict:
        return asdict(self)


ARCHS = {
    # MGC's ViT-S/16: 8 heads (timm's vit_small has 6), fixed 2-D sin-cos positions.
    "vit_s16": Arch("vit_small_patch16_224", 224, 16, 384, 12, 8, 4096, 128),
    # A ViT small enough to pretrain on a laptop CPU in minutes, with the same 14 x 14 grid.
    "tiny": Arch("vit_small_patch16_224", 112, 8, 128, 4, 4, 512, 64),
    # The ResNet-50 that DenseCL, SMoG and MCL were published on: its 7 x 7 last map (stride 32
    # at 224 px) is the token grid; heads 2048 wide, as DenseCL's.
    "resnet50": Arch("resnet50", 224, 32, 2048, 50, 0, 2048, 128, family="cnn"),
}


def create_backbone(arch: Arch, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm backbone without classifier. A ViT gets a fixed 2-D sin-cos position embedding
    (MoCo v3 / MGC): the embedding stays a parameter, so it is in the exported ``state_dict``
    under timm's own key, but it is never trained."""
    model = timm.create_model(
        arch.timm_name, pretrained=False, drop_path_rate=drop_path_rate, **arch.timm_kwargs()
    )
    return model if arch.family == "cnn" else _fix_sincos_positions(model, arch)


def _fix_sincos_positions(vit: nn.Module, arch: Arch) -> nn.Module:
    with torch.no_grad():
        table = build_sincos2d_pos_embed([arch.grid, arch.grid], arch.embed_dim)
        vit.pos_embed[:, vit.num_prefix_tokens :] = table
        vit.pos_embed[:, : vit.num_prefix_tokens] = 0
    vit.pos_embed.requires_grad_(False)
    return vit


def features(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global [B, C], tokens [B, grid*grid, C])`` of a timm ViT (the CLS token, the patch
    tokens) or a timm CNN (the mean of the last map, its positions row-major)."""
    out = backbone.forward_features(x)
    if out.dim() == 4:
        tokens = out.flatten(2).transpose(1, 2)
        return tokens.mean(1), tokens
    return out[:, 0], out[:, backbone.num_prefix_tokens :]


def patch_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, grid*grid, C]`` tokens of the last layer (see :func:`features`)."""
    return features(backbone, x)[1]


def no_weight_decay(backbone: nn.Module) -> set[str]:
    """Parameter names timm asks to keep out of weight decay (position embedding, CLS token);
    biases and norms are left out by their shape anyway."""
    names = getattr(backbone, "no_weight_decay", None)
    return set(names()) if names is not None else set()
