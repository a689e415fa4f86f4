"""Compiled Triton correspondence kernel on CUDA: bit for bit the torch reference (computed on
CPU) at the released sizes (B = 256, grid 14)."""

import pytest
import torch

import mgc_kernels as mk
from _geometry import released_views


@pytest.mark.parametrize("cell", [1, 2, 7, 14])
@pytest.mark.parametrize("metric", ["mgc", "iou", "ioa"])
def test_correspondence_bit_exact_on_cuda(cell, metric):
    cpu = released_views(seed=cell)
    cuda = [t.cuda() for t in cpu]
    want = mk.correspondence(*cpu, 14, cell, metric, backend="torch")
    assert torch.equal(mk.correspondence(*cuda, 14, cell, metric, backend="triton").cpu(), want)
