"""The torch reference on CUDA tensors gives what it gives on CPU (same pairs, same losses)."""

import pytest
import torch

import mgc_kernels as mk


def crops(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 200, (batch, 2, 2), generator=gen).double()
    wh = torch.randint(60, 240, (batch, 2, 2), generator=gen).double()
    boxes = torch.cat([xy, xy + wh], dim=-1)  # [B, view, 4]
    flips = torch.rand(batch, 2, generator=gen) < 0.5
    return boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1]


@pytest.mark.parametrize("cell, k", [(1, 10), (2, 10), (7, 2)])
def test_sample_pairs_same_on_cuda(cell, k):
    cpu = crops(256, cell)
    cuda = [t.cuda() for t in cpu]
    want = mk.sample_pairs(*cpu, 14, cell, k, backend="torch")
    got = mk.sample_pairs(*cuda, 14, cell, k, backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_mgc_loss_same_on_cuda(mode):
    views = crops(16, 3)
    crit = mk.MGCLoss(mode=mode, backend="torch")
    gen = torch.Generator().manual_seed(4)
    rows = crit.num_pairs if mode == "sparse" else [(14 // c) ** 2 for c in crit.cells]
    feats = [[torch.randn(16, r, 128, generator=gen) for r in rows] for _ in range(4)]
    kwargs = {"pairs": crit.sample_pairs(*views)} if mode == "sparse" else {"boxes": views}
    want = crit(*feats, **kwargs)
    cuda_kwargs = (
        {"pairs": [mk.Pairs(*(t.cuda() for t in p)) for p in kwargs["pairs"]]}
        if mode == "sparse"
        else {"boxes": [t.cuda() for t in views]}
    )
    got = crit(*[[t.cuda() for t in f] for f in feats], **cuda_kwargs)
    assert torch.allclose(got.cpu(), want, rtol=1e-4)
