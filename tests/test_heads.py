"""mgc_kernels.heads: layer layouts at the papers' sizes, output shapes, BatchNorm over every row,
DenseCL's two input layouts, DINO's normalised last layer, and the same layers, initial weights
and state_dict keys as the heads the reference trainer built by hand before (written out here)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgc_kernels as mk
from mgc_kernels.heads import (
    MLP,
    DenseCLDenseHead,
    DenseCLGlobalHead,
    DINOHead,
    MGCHeads,
    SMoGHeads,
    mgc_predictor,
    mgc_projector,
    mlp,
)


def layout(module: nn.Module) -> list[tuple]:
    """``(type, in, out, bias / affine)`` of each layer."""
    out = []
    for layer in module:
        if isinstance(layer, nn.Linear):
            out.append(("Linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, nn.BatchNorm1d):
            out.append(("BN", layer.num_features, layer.affine))
        else:
            out.append((type(layer).__name__,))
    return out


# The heads of python/mgc_pretrain before they moved into the library, written out.
def old_trainer_mlp(dims, last_norm="none"):
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_norm == "none"))
    if last_norm == "bn":
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def old_two_layer(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class OldDinoHead(nn.Module):
    def __init__(self, d_in, hidden, bottleneck, num_prototypes):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)


def same_state(new: nn.Module, old: nn.Module) -> None:
    a, b = new.state_dict(), old.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def build(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def test_mlp_layouts():
    assert layout(mlp([8, 16, 16, 4], last_batch_norm=True)) == [
        ("Linear", 8, 16, False),
        ("BN", 16, True),
        ("ReLU",),
        ("Linear", 16, 16, False),
        ("BN", 16, True),
        ("ReLU",),
        ("Linear", 16, 4, False),
        ("BN", 4, False),
    ]
    assert layout(mlp([8, 16, 4])) == [
        ("Linear", 8, 16, False),
        ("BN", 16, True),
        ("ReLU",),
        ("Linear", 16, 4, True),
    ]
    assert layout(mlp([8, 16, 4], batch_norm=False, activation="gelu")) == [
        ("Linear", 8, 16, True),
        ("GELU",),
        ("Linear", 16, 4, True),
    ]
    assert layout(mlp([8, 4])) == [("Linear", 8, 4, True)]
    assert isinstance(mlp([8, 4]), MLP) and isinstance(mlp([8, 4]), nn.Sequential)
    assert mlp([8, 16, 4])[2].inplace


@pytest.mark.parametrize(
    "dims, activation, match",
    [
        ([8], "relu", "dims"),
        (8, "relu", "dims"),
        ([8, 0, 4], "relu", r"dims\[1\]"),
        ([8, 2.0, 4], "relu", r"dims\[1\]"),
        ([8, 4], "tanh", "activation"),
    ],
)
def test_mlp_rejects_bad_arguments(dims, activation, match):
    with pytest.raises(ValueError, match=match):
        mlp(dims, activation=activation)


def test_head_constructors_name_the_bad_argument():
    for call, name in (
        (lambda: MGCHeads(0), "in_dim"),
        (lambda: MGCHeads(8, cells=()), "cells"),
        (lambda: MGCHeads(8, cells=(1, -2)), r"cells\[1\]"),
        (lambda: MGCHeads(8, hidden_dim=0), "hidden_dim"),
        (lambda: mgc_projector(8, num_layers=1), "num_layers"),
        (lambda: mgc_predictor(0), "dim"),
        (lambda: DenseCLDenseHead(8, out_dim=0), "out_dim"),
        (lambda: DINOHead(8, num_prototypes=0), "num_prototypes"),
    ):
        with pytest.raises(ValueError, match=name):
            call()


def test_mlp_batch_norm_sees_every_row_of_any_leading_shape():
    torch.manual_seed(0)
    head = mlp([6, 10, 3], last_batch_norm=True)
    x = torch.randn(4, 5, 6)
    got = head(x)
    assert got.shape == (4, 5, 3)
    torch.manual_seed(0)
    ref = mlp([6, 10, 3], last_batch_norm=True)
    assert torch.equal(got, ref(x.reshape(20, 6)).reshape(4, 5, 3))
    for a, b in zip(head.buffers(), ref.buffers()):  # one set of batch statistics over 20 rows
        assert torch.equal(a, b)
    # also after conversion to SyncBatchNorm (which would take [B, K, C] as [N, C, L])
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(mlp([6, 10, 3]))
    assert isinstance(sync, MLP) and isinstance(sync[1], nn.SyncBatchNorm)


def test_mgc_heads_at_the_papers_sizes():
    with torch.device("meta"):  # 4096-wide layers without allocating them
        heads = MGCHeads(384)
    assert heads.cells == (1, 2, 7)
    assert len(heads.projectors) == len(heads.predictors) == 3
    for proj, pred in zip(heads.projectors, heads.predictors):
        assert layout(proj) == [
            ("Linear", 384, 4096, False),
            ("BN", 4096, True),
            ("ReLU",),
            ("Linear", 4096, 4096, False),
            ("BN", 4096, True),
            ("ReLU",),
            ("Linear", 4096, 128, False),
            ("BN", 128, False),
        ]
        assert layout(pred) == [
            ("Linear", 128, 4096, False),
            ("BN", 4096, True),
            ("ReLU",),
            ("Linear", 4096, 128, True),
        ]


def test_mgc_heads_shapes_and_query_key_paths():
    torch.manual_seed(0)
    heads = MGCHeads(12, cells=(1, 7), hidden_dim=20, out_dim=5)
    x = torch.randn(3, 4, 12)  # [B, K, C] sampled regions
    for level in (0, 1, -1):
        q, k = heads(x, level), heads.project(x, level)
        assert q.shape == k.shape == (3, 4, 5)
        assert torch.equal(k, heads.projectors[level](x.reshape(12, 12)).reshape(3, 4, 5))
        assert torch.equal(q, heads.predictors[level](k.reshape(12, 5)).reshape(3, 4, 5))
    for bad in (2, -3, 1.0, True):
        with pytest.raises(ValueError, match="level"):
            heads(x, bad)
    q = heads(x, 0)
    q.sum().backward()
    assert all(p.grad is not None for p in heads.projectors[0].parameters())
    assert all(p.grad is not None for p in heads.predictors[0].parameters())
    assert all(p.grad is None for p in heads.projectors[1].parameters())


def test_mgc_heads_equal_the_old_trainer_heads():
    """Same layers, same initial weights from the same seed, same state_dict keys (checkpoints of
    the trainer keep loading): all projectors first, then all predictors."""
    new = build(3, MGCHeads, 16, (1, 2, 7), 24, 8)
    torch.manual_seed(3)
    old = nn.Module()
    old.projectors = nn.ModuleList(old_trainer_mlp([16, 24, 24, 8], "bn") for _ in range(3))
    old.predictors = nn.ModuleList(old_trainer_mlp([8, 24, 8]) for _ in range(3))
    same_state(new, old)
    assert list(new.state_dict())[:3] == [
        "projectors.0.0.weight",
        "projectors.0.1.weight",
        "projectors.0.1.bias",
    ]


def test_smog_heads():
    with torch.device("meta"):
        heads = SMoGHeads()
        paper = SMoGHeads(projector_layers=2)
    assert layout(heads.projector) == layout(mgc_projector(2048, 2048, 128))
    assert layout(paper.projector) == [
        ("Linear", 2048, 2048, False),
        ("BN", 2048, True),
        ("ReLU",),
        ("Linear", 2048, 128, False),
        ("BN", 128, False),
    ]
    assert layout(heads.predictor) == [
        ("Linear", 128, 2048, False),
        ("BN", 2048, True),
        ("ReLU",),
        ("Linear", 2048, 128, True),
    ]
    torch.manual_seed(0)
    small, x = SMoGHeads(12, 20, 6), torch.randn(5, 12)
    assert small(x).shape == small.project(x).shape == (5, 6)
    assert torch.equal(small(x), small.predictor(small.projector(x)))
    torch.manual_seed(1)
    old = nn.Module()
    old.projector = old_trainer_mlp([12, 20, 20, 6], "bn")
    old.predictor = old_trainer_mlp([6, 20, 6])
    same_state(build(1, SMoGHeads, 12, 20, 6), old)


def test_densecl_heads_layout_and_old_trainer_weights():
    with torch.device("meta"):
        for head in (DenseCLGlobalHead(), DenseCLDenseHead()):
            assert layout(head) == [
                ("Linear", 2048, 2048, True),
                ("ReLU",),
                ("Linear", 2048, 128, True),
            ]
    for cls in (DenseCLGlobalHead, DenseCLDenseHead):
        same_state(build(2, cls, 12, 20, 6), build(2, old_two_layer, 12, 20, 6))


def test_densecl_global_head_pools_maps_and_tokens():
    torch.manual_seed(0)
    head, fmap = DenseCLGlobalHead(12, 20, 6), torch.randn(2, 12, 3, 4)
    tokens = fmap.flatten(2).transpose(1, 2)  # [B, S, C], row-major
    pooled = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
    want = head[2](head[1](head[0](pooled)))
    for x in (fmap, tokens, pooled):
        got = head(x)
        assert got.shape == (2, 6)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x must be"):
        head(torch.randn(2, 12, 3, 4, 1))


def test_densecl_dense_head_is_a_pair_of_1x1_convolutions():
    torch.manual_seed(0)
    head, fmap = DenseCLDenseHead(12, 20, 6), torch.randn(2, 12, 3, 4)
    conv = F.conv2d(
        F.relu(F.conv2d(fmap, head[0].weight[:, :, None, None], head[0].bias)),
        head[2].weight[:, :, None, None],
        head[2].bias,
    )
    got = head(fmap)
    assert got.shape == (2, 6, 3, 4)
    torch.testing.assert_close(got, conv, rtol=1e-5, atol=1e-6)
    tokens = head(fmap.flatten(2).transpose(1, 2))
    assert tokens.shape == (2, 12, 6)
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    # DenseCLLoss takes either layout
    crit = mk.DenseCLLoss(dim=6, queue_size=8)
    glob = DenseCLGlobalHead(12, 20, 6)
    loss = crit(glob(fmap), glob(fmap).detach(), got, got.detach(), fmap, fmap, update=False)
    assert torch.isfinite(loss)


def test_dino_head():
    with torch.device("meta"):
        paper = DINOHead(384)
    assert layout(paper.mlp) == [
        ("Linear", 384, 2048, True),
        ("GELU",),
        ("Linear", 2048, 2048, True),
        ("GELU",),
        ("Linear", 2048, 256, True),
    ]
    assert paper.prototypes.shape == (65536, 256)
    torch.manual_seed(0)
    head = DINOHead(12, 20, 8, 30)
    with torch.no_grad():
        head.prototypes.mul_(torch.rand(30, 1) * 5 + 0.1)  # prototypes of various norms
    x = torch.randn(4, 3, 12)
    z = head(x)
    assert z.shape == (4, 3, 8)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4, 3))
    torch.testing.assert_close(z, head.mlp(x) / head.mlp(x).norm(dim=-1, keepdim=True))
    w = head.weight()
    assert w.shape == (30, 8)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(30))
    torch.testing.assert_close(w, head.prototypes / head.prototypes.norm(dim=-1, keepdim=True))
    # what linear_soft_ce takes: gradients reach the MLP and the prototypes
    teacher = DINOHead(12, 20, 8, 30)
    loss, _ = mk.linear_soft_ce(
        head(x[:, 0]),
        head.weight(),
        teacher(x[:, 1]).detach(),
        teacher.weight().detach(),
        backend="torch",
    )
    loss.backward()
    assert head.prototypes.grad is not None and head.prototypes.grad.abs().sum() > 0
    assert head.mlp[0].weight.grad.abs().sum() > 0
    same_state(build(4, DINOHead, 12, 20, 8, 30), build(4, OldDinoHead, 12, 20, 8, 30))


def test_heads_deep_copy_and_state_dict_round_trip():
    torch.manual_seed(0)
    heads = MGCHeads(12, (1, 2), 20, 6)
    copy = mk.momentum_copy(heads)
    x = torch.randn(3, 4, 12)
    assert torch.equal(heads.eval()(x, 1), copy.eval()(x, 1))
    other = MGCHeads(12, (1, 2), 20, 6)
    other.load_state_dict(heads.state_dict(), strict=True)
