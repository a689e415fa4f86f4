"""A ViT small enough for many short training runs in the test suite: the 14 x 14 token grid of
the real presets (so MGC's cells and MCL's ratios 1, 2, 7 apply), 56 px inputs, one block."""

from __future__ import annotations

from mgc_pretrain.config import PRESETS, Config
from mgc_pretrain.models import ARCHS, Arch

MICRO = Arch(
    "vit_small_patch16_224",
    img_size=56,
    patch_size=4,
    embed_dim=32,
    depth=1,
    num_heads=2,
    head_hidden=64,
    head_dim=16,
)


def register_micro() -> None:
    """Add the ``micro`` architecture and its preset (call in every process that trains)."""
    ARCHS["micro"] = MICRO
    PRESETS["micro"] = dict(
        PRESETS["tiny"],
        num_images=32,
        source_size=64,
        batch_size=8,
        queue_size=64,
        num_groups=8,
        num_prototypes=32,
        bank_size=32,
        epochs=1,
        warmup_epochs=1,
    )


def micro_config(output, **overrides) -> Config:
    register_micro()
    cfg = dict(arch="micro", output=str(output), workers=0, eval=False, num_queries=3)
    return Config(**{**cfg, **overrides}).with_preset()
