"""Compiled Triton region_boxes kernel on CUDA: bit for bit the torch reference (computed on CPU)
at the released sizes (B = 256, grid 14)."""

import pytest
import torch

import mgc_kernels as mk
from _geometry import released_views


@pytest.mark.parametrize("cell", [1, 2, 7, 14])
def test_region_boxes_bit_exact_on_cuda(cell):
    cpu = released_views(seed=cell)
    cuda = [t.cuda() for t in cpu]
    want = mk.region_boxes(cpu[0], cpu[1], 14, cell, backend="torch")
    assert torch.equal(mk.region_boxes(cuda[0], cuda[1], 14, cell, backend="triton").cpu(), want)
