"""The reference trainer on a GPU: every method, bf16 autocast, the Triton backend, a few steps."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("timm")

from _micro import micro_config  # noqa: E402
from mgc_pretrain.methods import PRETRAIN_METHODS  # noqa: E402
from mgc_pretrain.train import Trainer  # noqa: E402


@pytest.mark.parametrize("method", PRETRAIN_METHODS)
def test_methods_train_on_cuda_with_bf16_and_triton(tmp_path, method):
    trainer = Trainer(
        micro_config(tmp_path, method=method, steps=3, device="cuda", amp="bf16", backend="triton")
    )
    assert trainer.dist.device.type == "cuda"
    trainer.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    log = (tmp_path / "log.csv").read_text().splitlines()[1:]
    assert len(log) == 3 and all(math.isfinite(float(row.split(",")[2])) for row in log)
