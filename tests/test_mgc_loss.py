"""MGCLoss against the formula written out here; dense vs sparse; torch.compile; two ranks."""

import pytest
import torch
import torch.nn.functional as F

import mgc_kernels as mk
from _distributed import run_ranks

TAU = 0.1


def random_views(batch, gen, source=300):
    """Integer crops of a ``source``-pixel image, view 2 overlapping view 1, random flips."""
    b1 = torch.zeros(batch, 4, dtype=torch.float64)
    b2 = torch.zeros(batch, 4, dtype=torch.float64)
    for i in range(batch):
        x0, y0 = torch.randint(0, 100, (2,), generator=gen).tolist()
        w, h = torch.randint(120, 200, (2,), generator=gen).tolist()
        dx, dy = torch.randint(-60, 60, (2,), generator=gen).tolist()
        b1[i] = torch.tensor([x0, y0, x0 + w, y0 + h])
        b2[i] = torch.tensor([x0 + dx + 60, y0 + dy + 60, x0 + dx + 60 + h, y0 + dy + 60 + w])
    flips = torch.rand(2, batch, generator=gen) < 0.5
    return b1, flips[0], b2, flips[1]


def features(shapes, gen, dtype=torch.float64):
    return [torch.randn(*s, generator=gen, dtype=dtype, requires_grad=True) for s in shapes]


def direct_sparse(q1, q2, k1, k2, pairs, weights, weighting):
    """sum_c w_c (L_c(1->2) + L_c(2->1)) / sum_c w_c, InfoNCE over all rows of the batch."""
    total = 0
    for c, p in enumerate(pairs):
        w = p.weight.reshape(-1).double()
        rw = w if weighting == "overlap" else (w > 0).double()
        for q, k in ((q1[c], k2[c]), (q2[c], k1[c])):
            qn = F.normalize(q.reshape(-1, q.shape[-1]), dim=1)
            kn = F.normalize(k.reshape(-1, k.shape[-1]), dim=1)
            ce = F.cross_entropy(qn @ kn.T / TAU, torch.arange(len(qn)), reduction="none")
            total = total + weights[c] * (rw * ce).sum() / rw.sum()
    return total / sum(weights)


@pytest.mark.parametrize("weighting", ["uniform", "overlap"])
def test_sparse_equals_direct_formula(weighting):
    gen = torch.Generator().manual_seed(0)
    b1, f1, b2, f2 = random_views(5, gen)
    crit = mk.MGCLoss(weighting=weighting)
    pairs = crit.sample_pairs(b1, f1, b2, f2)
    assert any((p.weight == 0).any() for p in pairs) or weighting == "overlap"
    shapes = [(5, k, 16) for k in crit.num_pairs]
    q1, q2, k1, k2 = (features(shapes, gen) for _ in range(4))
    loss = crit(q1, q2, k1, k2, pairs)
    expected = direct_sparse(q1, q2, k1, k2, pairs, (10, 10, 2), weighting)
    assert torch.allclose(loss, expected, rtol=1e-12)
    leaves = q1 + q2 + k1 + k2
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(expected, leaves)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


def test_uniform_leaves_padded_rows_out_but_keeps_their_keys():
    # identical views at cell 1: 6 real pairs and 4 padded ones per image
    box = torch.tensor([[0.0, 0, 224, 224]])
    flip = torch.tensor([False])
    crit = mk.MGCLoss(cells=(1,), num_pairs=(10,))
    pairs = crit.sample_pairs(box, flip, box, flip)
    assert int((pairs[0].weight > 0).sum()) == 6
    gen = torch.Generator().manual_seed(1)
    q1, q2, k1, k2 = (features([(1, 10, 8)], gen) for _ in range(4))
    loss = crit(q1, q2, k1, k2, pairs)
    real = pairs[0].weight.reshape(-1) > 0
    expected = 0
    for q, k in ((q1[0][0], k2[0][0]), (q2[0][0], k1[0][0])):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / TAU  # all 10 keys
        expected = expected + F.cross_entropy(logits[real], torch.arange(10)[real])
    assert torch.allclose(loss, expected)


def test_dense_with_one_target_per_row_equals_sparse_overlap():
    # identical crops per image (view 2 flipped or not): every region of view 1 overlaps exactly
    # one region of view 2, and method "all" pairs every region, so both modes see the same rows
    # and the same keys.
    box = torch.tensor([[0.0, 0, 224, 224], [10, 20, 150, 100], [5, 5, 105, 205]])
    f1 = torch.tensor([False, True, False])
    f2 = torch.tensor([True, True, False])
    cells = (2, 7)
    gen = torch.Generator().manual_seed(2)
    dense = mk.MGCLoss(cells=cells, num_pairs=(4, 1), mode="dense")
    sparse = mk.MGCLoss(cells=cells, num_pairs=(4, 1), weighting="overlap", sample_method="all")
    shapes = [(3, (14 // c) ** 2, 8) for c in cells]
    q1, q2, k1, k2 = (features(shapes, gen) for _ in range(4))
    pairs = sparse.sample_pairs(box, f1, box, f2)
    assert [p.idx1.shape[1] for p in pairs] == [49, 4]
    gathered = [[p.gather(a, b) for p, a, b in zip(pairs, x, y)] for x, y in ((q1, q2), (k1, k2))]
    sq1, sq2 = zip(*gathered[0])
    sk1, sk2 = zip(*gathered[1])
    loss_sparse = sparse(list(sq1), list(sq2), list(sk1), list(sk2), pairs)
    loss_dense = dense(q1, q2, k1, k2, boxes=(box, f1, box, f2))
    assert torch.allclose(loss_dense, loss_sparse, rtol=1e-12)
    leaves = q1 + q2 + k1 + k2
    for g, e in zip(
        torch.autograd.grad(loss_dense, leaves), torch.autograd.grad(loss_sparse, leaves)
    ):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


def test_dense_equals_direct_soft_target_formula():
    gen = torch.Generator().manual_seed(3)
    b1, f1, b2, f2 = random_views(2, gen)
    crit = mk.MGCLoss(cells=(7,), num_pairs=(1,), mode="dense", metric="iou")
    q1, q2, k1, k2 = (features([(2, 4, 8)], gen) for _ in range(4))
    loss = crit(q1, q2, k1, k2, boxes=(b1, f1, b2, f2))
    expected = 0
    for (q, k), (ba, fa, bb, fb) in (
        ((q1[0], k2[0]), (b1, f1, b2, f2)),
        ((q2[0], k1[0]), (b2, f2, b1, f1)),
    ):
        w = torch.block_diag(*mk.correspondence(ba, fa, bb, fb, 14, 7, "iou"))  # [8, 8]
        rho = w.sum(1)
        logp = torch.log_softmax(
            F.normalize(q.reshape(8, 8), dim=1) @ F.normalize(k.reshape(8, 8), dim=1).T / TAU, dim=1
        )
        ce = -(w / rho.clamp_min(1e-300)[:, None] * logp).sum(1)
        expected = expected + (rho * ce).sum() / rho.sum()
    assert torch.allclose(loss, expected, rtol=1e-12)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_training_step(compiler):
    crit = mk.MGCLoss()
    gen = torch.Generator().manual_seed(4)
    b1, f1, b2, f2 = random_views(2, gen)
    pairs = crit.sample_pairs(b1, f1, b2, f2)
    head = torch.nn.Linear(12, 8)

    def step(tokens1, tokens2):
        g1 = mk.multigrain_pool(tokens1, 14, crit.cells)
        g2 = mk.multigrain_pool(tokens2, 14, crit.cells)
        q1, q2, k1, k2 = [], [], [], []
        for p, a, b in zip(pairs, g1, g2):
            s1, s2 = p.gather(a, b)
            q1.append(head(s1)), q2.append(head(s2))
            k1.append(head(s1).detach()), k2.append(head(s2).detach())
        return crit(q1, q2, k1, k2, pairs)

    t1, t2 = (torch.randn(2, 196, 12, generator=gen, requires_grad=True) for _ in range(2))
    eager = step(t1, t2)
    eager_grads = torch.autograd.grad(eager, (t1, t2))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(t1, t2)
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(compiled, (t1, t2)), eager_grads):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cells=(1, 3)), "cell must divide grid"),
        (dict(cells=()), "cells"),
        (dict(num_pairs=(10, 10)), "num_pairs"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1), "temperature"),
        (dict(mode="full"), "mode"),
        (dict(weighting="area"), "weighting"),
        (dict(mode="dense", weighting="uniform"), "weighting"),
        (dict(metric="dice"), "metric"),
        (dict(granularity_weights=(1, 1)), "granularity_weights"),
        (dict(granularity_weights=(0, 0, 0)), "granularity_weights"),
        (dict(sample_method="random"), "sample_method"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.MGCLoss(**kwargs)


def test_bad_forward_inputs():
    crit = mk.MGCLoss(cells=(7,), num_pairs=(2,))
    box = torch.tensor([[0.0, 0, 224, 224]])
    flip = torch.tensor([False])
    pairs = crit.sample_pairs(box, flip, box, flip)
    x = [torch.randn(1, 2, 8)]
    with pytest.raises(ValueError, match="pairs is required"):
        crit(x, x, x, x)
    with pytest.raises(ValueError, match="q1"):
        crit(x[0], x, x, x, pairs)
    with pytest.raises(ValueError, match=r"k2\[0\]"):
        crit(x, x, x, [torch.randn(1, 3, 8)], pairs)
    with pytest.raises(ValueError, match="boxes"):
        mk.MGCLoss(cells=(7,), num_pairs=(2,), mode="dense")(x, x, x, x)


# ----------------------------------------------------------------------------- two ranks


def _two_rank_losses(rank, world, mode):
    """Every rank builds the full batch from one seed, keeps its half, and returns its loss and
    gradients; rank -1 computes the single-process reference over the whole batch."""
    gen = torch.Generator().manual_seed(5)
    batch = 4
    b1, f1, b2, f2 = random_views(batch, gen)
    crit = mk.MGCLoss(
        mode=mode, weighting="overlap" if mode == "sparse" else None, gather_distributed=rank >= 0
    )
    rows = [k for k in crit.num_pairs] if mode == "sparse" else [(14 // c) ** 2 for c in crit.cells]
    full = [
        [torch.randn(batch, r, 8, generator=gen, dtype=torch.float64) for r in rows]
        for _ in range(4)
    ]
    part = slice(None) if rank < 0 else slice(rank * batch // world, (rank + 1) * batch // world)
    mine = [[t[part].clone().requires_grad_() for t in x] for x in full]
    views = (b1[part], f1[part], b2[part], f2[part])
    if mode == "sparse":
        loss = crit(*mine, pairs=crit.sample_pairs(*views))
    else:
        loss = crit(*mine, boxes=views)
    grads = torch.autograd.grad(loss, [t for x in mine for t in x])
    return {"loss": loss.detach(), "grads": [g.detach() for g in grads]}


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_two_ranks_equal_one_process_over_the_whole_batch(mode):
    single = _two_rank_losses(-1, 1, mode)
    ranks = run_ranks(_two_rank_losses, 2, mode)
    # DDP averages over ranks: the mean loss is the one-process loss, and each rank's gradient
    # divided by the world size is the one-process gradient of its rows
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"], rtol=1e-10)
    for i, g in enumerate(single["grads"]):
        halves = torch.cat([ranks[0]["grads"][i], ranks[1]["grads"][i]]) / 2
        assert torch.allclose(halves, g, rtol=1e-8, atol=1e-12)
