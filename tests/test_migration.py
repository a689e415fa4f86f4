"""The equivalences docs/migration.md documents, one or more tests per method.

Each test computes the code people switch from the way that code computes it, written out here
(or, for lightly, lightly itself), and compares it with this library configured as the page says,
on small float64 inputs: MGC's released loss, DenseCL's authors' queues and loss, DINO's
``DINOLoss`` (ADCLR's CLS term), MCL's released loss and montages, lightly's SMoG step, and
lightly's DetConB/DetConS expressed with ``mk.info_nce``.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mgc_kernels as mk

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, grad=False):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).requires_grad_(grad)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# ----------------------------------------------------------------------------- MGC

MGC_CELLS, MGC_PAIRS, MGC_TAU = (1, 2, 7), (10, 10, 2), 0.1


def _released_mgc_direction(q, k, tau):
    """module/loss.py of the release: every row against every key of the (flattened) batch, a
    mean-reduced cross-entropy; the pair weights multiply that scalar and cancel."""
    q, k = (
        F.normalize(q.reshape(-1, q.shape[-1]), dim=1),
        F.normalize(k.reshape(-1, k.shape[-1]), dim=1),
    )
    return F.cross_entropy(q @ k.T / tau, torch.arange(len(q)))


def _released_mgc(q1, q2, k1, k2, tau=MGC_TAU):
    """main_pretrain.py: (10 (l1 + l2) + 10 (l5 + l6) + 2 (l3 + l4)) / 22, keys detached."""
    terms = [
        K
        * (
            _released_mgc_direction(a, d.detach(), tau)
            + _released_mgc_direction(b, c.detach(), tau)
        )
        for K, a, b, c, d in zip(MGC_PAIRS, q1, q2, k1, k2)
    ]
    return sum(terms) / sum(MGC_PAIRS)


def _mgc_inputs(batch=3, dim=8, seed=0):
    q1 = [_randn(batch, K, dim, seed=seed + i, grad=True) for i, K in enumerate(MGC_PAIRS)]
    q2 = [_randn(batch, K, dim, seed=seed + 10 + i, grad=True) for i, K in enumerate(MGC_PAIRS)]
    k1 = [_randn(batch, K, dim, seed=seed + 20 + i) for i, K in enumerate(MGC_PAIRS)]
    k2 = [_randn(batch, K, dim, seed=seed + 30 + i) for i, K in enumerate(MGC_PAIRS)]
    return q1, q2, k1, k2


def _pairs(batch, seed, pad=()):
    """Pairs with random positive weights (the released 'ious'), index rows irrelevant to the
    loss; `pad` lists (cell, b, r) entries made padding (0, 0, 0)."""
    out = []
    for i, (c, K) in enumerate(zip(MGC_CELLS, MGC_PAIRS)):
        regions = (14 // c) ** 2
        g = _gen(seed + i)
        idx1, idx2 = (torch.randint(regions, (batch, K), generator=g) for _ in range(2))
        weight = torch.rand(batch, K, generator=g, dtype=F64) * 0.5 + 0.01
        for cell, b, r in pad:
            if cell == i:
                idx1[b, r] = idx2[b, r] = 0
                weight[b, r] = 0
        out.append(mk.Pairs(idx1, idx2, weight))
    return out


def test_mgc_released_loss_equals_uniform_weighting():
    q1, q2, k1, k2 = _mgc_inputs()
    pairs = _pairs(3, seed=5)
    crit = mk.MGCLoss(
        cells=MGC_CELLS, num_pairs=MGC_PAIRS, temperature=MGC_TAU, weighting="uniform"
    )
    loss = crit(q1, q2, [k.detach() for k in k1], [k.detach() for k in k2], pairs=pairs)
    expected = _released_mgc(q1, q2, k1, k2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(loss, q1 + q2), _grads(expected, q1 + q2))
    # the pair weights do matter under weighting="overlap" (the same inputs give another loss)
    overlap = mk.MGCLoss(
        cells=MGC_CELLS, num_pairs=MGC_PAIRS, temperature=MGC_TAU, weighting="overlap"
    )(q1, q2, k1, k2, pairs=pairs)
    assert not torch.allclose(overlap, expected, rtol=1e-6)


def test_mgc_padded_rows_leave_the_mean_but_stay_negatives():
    q1, q2, k1, k2 = _mgc_inputs(seed=40)
    pad = [(0, 1, 9), (0, 2, 8), (2, 0, 1)]
    loss = mk.MGCLoss(weighting="uniform")(q1, q2, k1, k2, pairs=_pairs(3, seed=7, pad=pad))

    def direction(q, k, cell):
        q, k = (
            F.normalize(q.reshape(-1, q.shape[-1]), dim=1),
            F.normalize(k.reshape(-1, k.shape[-1]), dim=1),
        )
        ce = F.cross_entropy(q @ k.T / MGC_TAU, torch.arange(len(q)), reduction="none")
        real = torch.ones(q1[cell].shape[:2], dtype=torch.bool)
        for c, b, r in pad:
            if c == cell:
                real[b, r] = False
        return ce[real.reshape(-1)].mean()  # padded rows out, their keys still in k

    expected = sum(
        K * (direction(q1[i], k2[i], i) + direction(q2[i], k1[i], i))
        for i, K in enumerate(MGC_PAIRS)
    ) / sum(MGC_PAIRS)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(loss, _released_mgc(q1, q2, k1, k2), rtol=1e-6)


# ----------------------------------------------------------------------------- DenseCL


def densecl_state_from_authors(state):
    """The conversion docs/migration.md gives: the authors' [dim, K] queues and [1] pointers to
    DenseCLLoss's [K, dim] queues and scalar pointers."""
    return {
        "global_queue": state["queue"].t().contiguous(),
        "global_queue_ptr": state["queue_ptr"].reshape(()),
        "dense_queue": state["queue2"].t().contiguous(),
        "dense_queue_ptr": state["queue2_ptr"].reshape(()),
    }


def _authors_densecl_step(q, k, q_grid, k_grid, q_b, k_b, state, tau, loss_lambda):
    """openselfsup/models/densecl.py forward_train after the encoders, in place on `state`
    ([dim, K] queues). Maps are [N, C, H, W]; q_grid/k_grid the dense head outputs."""
    n, dim = q.shape
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    k2 = F.normalize(k_grid.mean((2, 3)), dim=1)  # avgpool2 of the dense head
    q_grid = F.normalize(q_grid.flatten(2), dim=1)  # N x C x S^2
    k_grid = F.normalize(k_grid.flatten(2), dim=1)
    q_b = F.normalize(q_b.flatten(2), dim=1)
    k_b = F.normalize(k_b.flatten(2), dim=1)

    def head(pos, neg):  # ContrastiveHead
        logits = torch.cat([pos, neg], 1) / tau
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ state["queue"].clone()
    match = (q_b.permute(0, 2, 1) @ k_b).max(dim=2)[1]
    indexed = torch.gather(k_grid, 2, match.unsqueeze(1).expand(-1, k_grid.size(1), -1))
    l_pos_dense = (q_grid * indexed).sum(1).reshape(-1, 1)
    q_flat = q_grid.permute(0, 2, 1).reshape(-1, dim)
    l_neg_dense = q_flat @ state["queue2"].clone()
    loss = (1 - loss_lambda) * head(l_pos, l_neg) + loss_lambda * head(l_pos_dense, l_neg_dense)
    for name, keys in (("queue", k), ("queue2", k2)):  # _dequeue_and_enqueue(2)
        ptr = int(state[f"{name}_ptr"])
        state[name][:, ptr : ptr + n] = keys.detach().t()
        state[f"{name}_ptr"][0] = (ptr + n) % state[name].shape[1]
    return loss


def test_densecl_authors_queues_load_and_give_the_authors_loss():
    n, dim, queue_len, channels, side, tau, lam = 4, 8, 16, 6, 3, 0.2, 0.5
    authors = {
        "queue": F.normalize(_randn(dim, queue_len, seed=1), dim=0),
        "queue_ptr": torch.tensor([12]),
        "queue2": F.normalize(_randn(dim, queue_len, seed=2), dim=0),
        "queue2_ptr": torch.tensor([12]),
    }
    crit = mk.DenseCLLoss(dim=dim, queue_size=queue_len, temperature=tau, loss_lambda=lam).to(F64)
    crit.load_state_dict(densecl_state_from_authors(authors))
    q, k = _randn(n, dim, seed=3, grad=True), _randn(n, dim, seed=4)
    dq, dk = _randn(n, dim, side, side, seed=5, grad=True), _randn(n, dim, side, side, seed=6)
    f1, f2 = _randn(n, channels, side, side, seed=7), _randn(n, channels, side, side, seed=8)

    crit.train()
    loss = crit(q, k, dq, dk, f1, f2)
    theirs = {name: t.clone() for name, t in authors.items()}
    expected = _authors_densecl_step(q, k, dq, dk, f1, f2, theirs, tau, lam)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(loss, (q, dq)), _grads(expected, (q, dq)))
    # after the step both hold the same keys: the enqueue wrapped to 0 in both layouts
    torch.testing.assert_close(densecl_state_from_authors(theirs), crit.state_dict())
    assert int(crit.global_queue_ptr) == int(crit.dense_queue_ptr) == 0
    # and the [dim, S] layout of the authors' neck must be transposed, not passed as is
    tokens = crit(
        q, k, dq.flatten(2).transpose(1, 2), dk.flatten(2).transpose(1, 2), f1, f2, update=False
    )
    torch.testing.assert_close(tokens, crit(q, k, dq, dk, f1, f2, update=False))


# ----------------------------------------------------------------------------- ADCLR (DINO)


def _dino_schedule(warmup, final, warmup_epochs, epochs):
    return np.concatenate(
        (np.linspace(warmup, final, warmup_epochs), np.ones(epochs - warmup_epochs) * final)
    )


def _dino_loss(student_output, teacher_output, center, ncrops, temp, student_temp, momentum):
    """main_dino.py DINOLoss.forward (one process): returns (loss, new centre [1, K])."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    batch_center = teacher_output.sum(0, keepdim=True) / len(teacher_output)
    return total / terms, center * momentum + batch_center * (1 - momentum)


@pytest.mark.parametrize("with_queries", [False, True])
def test_adclr_cls_term_is_dino_loss(with_queries):
    views, batch, dim, dim_t, protos, epochs = 4, 3, 5, 6, 7, 100
    schedule = _dino_schedule(0.04, 0.07, 30, epochs)
    student_cls = _randn(views, batch, dim, seed=1, grad=True)
    teacher_cls = _randn(2, batch, dim_t, seed=2)
    w_s, w_t = _randn(protos, dim, seed=3, grad=True), _randn(protos, dim_t, seed=4)
    dino_center = _randn(1, protos, seed=5)  # DINOLoss's `center` buffer
    crit = mk.ADCLRLoss(num_prototypes=protos, query_weight=0.0).to(F64)
    crit.load_state_dict(
        {"center_cls": dino_center.reshape(-1), "center_query": torch.zeros(protos, dtype=F64)}
    )
    queries = (
        (_randn(2, batch, 2, dim, seed=6, grad=True), _randn(2, batch, 2, dim_t, seed=7))
        if with_queries
        else (None, None)
    )
    crit.train()
    for epoch in (3, 45):  # in and after the warm-up
        loss = crit(student_cls, teacher_cls, *queries, w_s, w_t, epoch=epoch)
        expected, dino_center = _dino_loss(
            torch.cat(list(student_cls)) @ w_s.T,
            torch.cat(list(teacher_cls)) @ w_t.T,
            dino_center,
            views,
            schedule[epoch],
            0.1,
            0.9,
        )
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            _grads(loss, (student_cls, w_s)), _grads(expected, (student_cls, w_s))
        )
        torch.testing.assert_close(crit.center_cls, dino_center.reshape(-1))


def test_adclr_accepts_dino_teacher_logits():
    # teacher_weight=None: the [2, B, K] teacher logits DINO's teacher head returns
    student_cls, w_s = _randn(2, 3, 5, seed=1, grad=True), _randn(7, 5, seed=2, grad=True)
    teacher_logits = _randn(2, 3, 7, seed=3)
    crit = (
        mk.ADCLRLoss(
            num_prototypes=7, warmup_teacher_temperature_epochs=0, teacher_temperature=0.04
        )
        .to(F64)
        .eval()
    )
    loss = crit(student_cls, teacher_logits, None, None, w_s, epoch=0)
    expected, _ = _dino_loss(
        torch.cat(list(student_cls)) @ w_s.T,
        torch.cat(list(teacher_logits)),
        torch.zeros(1, 7, dtype=F64),
        2,
        0.04,
        0.1,
        0.9,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert not crit.center_cls.any()  # eval(): the centre stays


# ----------------------------------------------------------------------------- MCL

MCL_RATIOS, MCL_WEIGHTS = (1, 2, 4, 8), (1 / 2, 1 / 4, 1 / 8, 1 / 8)


def _released_combine(images, count, ratio, generator):
    """random_combine_img of the release: slots drawn by randperm(r^2 * count) mod B, tiles the
    nearest-neighbour 1/r downsampling; returns (montages, labels [count * r^2])."""
    b, c = images.shape[:2]
    idx = torch.fmod(torch.randperm(ratio * ratio * count, generator=generator), b)
    small = F.interpolate(images, scale_factor=1.0 / ratio)[idx]
    h, w = small.shape[2:]
    tiles = small.reshape(count, ratio, ratio, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(count, c, ratio * h, ratio * w), idx


def _released_mcl(q1, q2, k1, k2, s1, s2, tau):
    """LatentMultiPredictContrastHead: per level and view, CE(l2n(q) @ l2n(k_other).T / T, label)
    * 2T * loss_weight, keys detached; the runner sums every term."""
    total = 0
    for level, w in enumerate(MCL_WEIGHTS):
        for q, k, s in ((q1[level], k2, s1[level]), (q2[level], k1, s2[level])):
            logits = (
                F.normalize(q.reshape(-1, q.shape[-1]), dim=1) @ F.normalize(k.detach(), dim=1).T
            )
            total = total + F.cross_entropy(logits / tau, s.reshape(-1)) * (2 * tau) * w
    return total


@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_mcl_released_loss(tau):
    batch, dim = 64, 6
    counts = (batch, batch // 4, batch // 16, batch // 32)  # the released batch_sizes
    g = _gen(0)
    images = torch.zeros(batch, 1, 8, 8)
    s1 = [
        _released_combine(images, m, r, g)[1].reshape(m, r * r) for m, r in zip(counts, MCL_RATIOS)
    ]
    s2 = [
        _released_combine(images, m, r, g)[1].reshape(m, r * r) for m, r in zip(counts, MCL_RATIOS)
    ]
    s1[0] = s2[0] = torch.arange(batch)[:, None]  # level 0: the plain views
    q1 = [
        _randn(m, r * r, dim, seed=i, grad=True) for i, (m, r) in enumerate(zip(counts, MCL_RATIOS))
    ]
    q2 = [
        _randn(m, r * r, dim, seed=9 + i, grad=True)
        for i, (m, r) in enumerate(zip(counts, MCL_RATIOS))
    ]
    k1, k2 = _randn(batch, dim, seed=20, grad=True), _randn(batch, dim, seed=21, grad=True)
    crit = mk.MCLLoss(ratios=MCL_RATIOS, grid=8, temperature=tau)  # loss_scale None = 2T
    assert crit.level_weights == MCL_WEIGHTS
    loss = crit(q1, q2, k1, k2, s1, s2)
    expected = _released_mcl(q1, q2, k1, k2, s1, s2, tau)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(loss, q1 + q2), _grads(expected, q1 + q2))
    # keys are detached, as the release's momentum keys are
    assert torch.autograd.grad(crit(q1, q2, k1, k2, s1, s2), k1, allow_unused=True)[0] is None


@pytest.mark.parametrize("ratio", [2, 4])
def test_mcl_nearest_montage_is_every_rth_pixel(ratio):
    batch = 2 * ratio * ratio
    images = _randn(batch, 3, 16, 16, seed=1)
    montages, sources = mk.transforms.montage(images, ratio, resize="nearest", generator=_gen(2))
    count = math.ceil(batch / ratio**2)
    assert montages.shape == (count, 3, 16, 16) and sources.shape == (count, ratio * ratio)
    side = 16 // ratio
    released = F.interpolate(images, scale_factor=1.0 / ratio)  # the release's resize
    torch.testing.assert_close(released, images[:, :, ::ratio, ::ratio], rtol=0, atol=0)
    for m in range(count):
        for s in range(ratio * ratio):
            row, col = divmod(s, ratio)
            tile = montages[m, :, row * side : (row + 1) * side, col * side : (col + 1) * side]
            torch.testing.assert_close(tile, released[sources[m, s]], rtol=0, atol=0)
    # the release's tiling of labelled slots: (montage, tile row, tile column), row-major
    tiles = released[sources.reshape(-1)].reshape(count, ratio, ratio, 3, side, side)
    torch.testing.assert_close(
        tiles.permute(0, 3, 1, 4, 2, 5).reshape(count, 3, 16, 16), montages, rtol=0, atol=0
    )
    # the released B/32 montages at ratio 8 are count=B // 32
    assert mk.transforms.montage(_randn(64, 1, 8, 8, seed=3), 8, count=2, resize="nearest")[
        1
    ].shape == (2, 64)


# ----------------------------------------------------------------------------- SMoG


def _lightly_smog_step(p, proj, z, groups, beta, tau):
    """lightly 1.6 SMoGPrototypes as its example steps them: targets = argmax cos(z, G) (z the
    momentum projections); each online projection `proj` moves the group of ITS OWN argmax
    cosine by the raw mean of its rows (with gradient); CE of cos(p, G') / tau with `p` the
    predictions; G' stored as it is."""

    def cos(x, g):
        return F.normalize(x, dim=1) @ F.normalize(g, dim=1).T

    targets = cos(z, groups).argmax(1)
    own = cos(proj.detach(), groups).argmax(1)
    one_hot = F.one_hot(own, len(groups)).to(proj.dtype)
    counts = one_hot.sum(0)[:, None]
    moved = torch.where(
        counts > 0, beta * groups + (1 - beta) * one_hot.T @ proj / counts.clamp_min(1), groups
    )
    return F.cross_entropy(cos(p, moved) / tau, targets), moved.detach()


def _smog(groups, variant, beta, tau):
    crit = mk.SMoGLoss(
        dim=groups.shape[1],
        num_groups=len(groups),
        temperature=tau,
        beta=beta,
        reset_every=0,
        bank_size=0,
        symmetric=False,
        variant=variant,
    ).to(F64)
    crit.load_state_dict({**crit.state_dict(), "grouping.groups": groups.clone()})
    return crit.train()


@pytest.mark.parametrize("separate_projections", [True, False])
def test_smog_lightly_variant_follows_lightly_step(separate_projections):
    groups = F.normalize(_randn(12, 6, seed=1), dim=1)
    p, z = _randn(10, 6, seed=2, grad=True), _randn(10, 6, seed=3)
    proj = _randn(10, 6, seed=4, grad=True) if separate_projections else p
    crit = _smog(groups, "lightly", beta=0.9, tau=0.2)
    for _ in range(2):  # step 2 starts from non-unit groups
        loss = crit(p, z, proj1=proj)
        expected, groups = _lightly_smog_step(p, proj, z, groups, 0.9, 0.2)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crit.grouping.groups, groups)
        inputs = (p, proj) if separate_projections else (p,)
        torch.testing.assert_close(_grads(loss, inputs), _grads(expected, inputs))


def test_smog_default_variant_is_not_lightlys():
    groups = F.normalize(_randn(12, 6, seed=1), dim=1)
    p, z = _randn(10, 6, seed=2), _randn(10, 6, seed=3)
    crit = _smog(groups, "smog", beta=0.9, tau=0.2)
    crit(p, z)
    _, lightly_groups = _lightly_smog_step(p, p, z, groups, 0.9, 0.2)
    assert not torch.allclose(crit.grouping.groups, lightly_groups)
    torch.testing.assert_close(crit.grouping.groups.norm(dim=1), torch.ones(12, dtype=F64))


def test_smog_lightly_state_maps_onto_grouping_groups():
    heads = pytest.importorskip("lightly.models.modules.heads", reason="lightly is not installed")
    groups = F.normalize(_randn(12, 6, seed=1), dim=1)
    prototypes = heads.SMoGPrototypes(group_features=groups.clone(), beta=0.9)
    p, z, proj = _randn(10, 6, seed=2, grad=True), _randn(10, 6, seed=3), _randn(10, 6, seed=4)
    for _ in range(2):  # lightly's example step
        assignments = prototypes.assign_groups(z)  # x1_encoded (momentum)
        updated = prototypes.get_updated_group_features(proj)  # x0_encoded
        theirs = F.cross_entropy(prototypes(p, updated, temperature=0.2), assignments)
        prototypes.set_group_features(updated)
    crit = _smog(groups, "lightly", beta=0.9, tau=0.2)
    for _ in range(2):
        ours = crit(p, z, proj1=proj)
    torch.testing.assert_close(ours, theirs)
    # the documented key mapping: lightly `group_features` -> ours `grouping.groups`, as is
    state = prototypes.state_dict()
    torch.testing.assert_close(state["group_features"], crit.grouping.groups)
    resumed = _smog(state["group_features"], "lightly", beta=0.9, tau=0.2)
    torch.testing.assert_close(resumed(p, z, proj1=proj), crit(p, z, proj1=proj))


# ----------------------------------------------------------------------------- DetCon


def detcon_direction(pred, target_other, target_same, mask, mask_other, temperature):
    """docs/migration.md's expression of one DetConB direction with mk.info_nce: per (image,
    mask id) group of rows, keys = all targets of the other view + the targets of the own view
    without the group's own (image, mask id) regions; soft targets on the other view's regions
    of that id; rows weighted 1 / group size; the sum over rows divided by B * M."""
    b_size, m_size, dim = pred.shape
    other, same = target_other.reshape(-1, dim), target_same.reshape(-1, dim)
    total = pred.new_zeros(())
    for b in range(b_size):
        for v in mask[b].unique():
            rows = (mask[b] == v).nonzero().squeeze(1)
            drop = torch.zeros(b_size, m_size, dtype=torch.bool)
            drop[b] = mask[b] == v
            keys = torch.cat([other, same[~drop.reshape(-1)]])
            index = (b * m_size + torch.arange(m_size)).expand(len(rows), m_size)
            weight = (mask_other[b] == v).to(pred.dtype).expand(len(rows), m_size)
            total = total + mk.info_nce(
                pred[b, rows],
                keys,
                (index, weight),
                temperature,
                row_weights=torch.full((len(rows),), 1.0 / len(rows), dtype=pred.dtype),
                reduction="sum",
            )
    return total / (b_size * m_size)


@pytest.mark.parametrize("distinct_ids", [True, False])
def test_detconb_with_info_nce(distinct_ids):
    detcon = pytest.importorskip("lightly.loss.detcon_loss", reason="lightly is not installed")
    b_size, m_size, dim, tau = 3, 5, 4, 0.1
    if distinct_ids:  # lightly's example: idx = arange(M) in both views
        m0 = m1 = torch.arange(m_size).expand(b_size, m_size)
    else:  # sampled masks: repeats, and ids missing from the other view
        m0 = torch.randint(4, (b_size, m_size), generator=_gen(1))
        m1 = torch.randint(4, (b_size, m_size), generator=_gen(2))
    p0, p1 = (
        _randn(b_size, m_size, dim, seed=3, grad=True),
        _randn(b_size, m_size, dim, seed=4, grad=True),
    )
    # targets near the predictions, as after some training: the excluded keys then matter
    t0 = (p0.detach() + 0.3 * _randn(b_size, m_size, dim, seed=5)).requires_grad_()
    t1 = (p1.detach() + 0.3 * _randn(b_size, m_size, dim, seed=6)).requires_grad_()
    theirs = detcon.DetConBLoss(temperature=tau, gather_distributed=False)(p0, p1, t0, t1, m0, m1)
    ours = detcon_direction(p0, t1, t0, m0, m1, tau) + detcon_direction(p1, t0, t1, m1, m0, tau)
    # lightly builds its label weights in float32 (1/3 is not exact there)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    inputs = (p0, p1, t0, t1)
    torch.testing.assert_close(_grads(ours, inputs), _grads(theirs, inputs), rtol=1e-6, atol=1e-7)
    # one info_nce call without the per-row exclusion is a different loss
    keys = torch.cat([t1.reshape(-1, dim), t0.reshape(-1, dim)])
    rows = torch.arange(b_size * m_size)
    index = (rows // m_size * m_size)[:, None] + torch.arange(m_size)
    weight = (m1.repeat_interleave(m_size, 0) == m0.reshape(-1, 1)).to(F64)
    area = (m0[:, :, None] == m0[:, None, :]).sum(-1).reshape(-1).to(F64)
    unmasked = mk.info_nce(
        p0.reshape(-1, dim), keys, (index, weight), tau, row_weights=1 / area, reduction="sum"
    )
    assert not torch.allclose(
        unmasked / (b_size * m_size), detcon_direction(p0, t1, t0, m0, m1, tau), rtol=1e-2
    )


def test_detcons_is_detconb_with_shared_branches():
    detcon = pytest.importorskip("lightly.loss.detcon_loss", reason="lightly is not installed")
    v0, v1 = _randn(2, 4, 4, seed=1, grad=True), _randn(2, 4, 4, seed=2, grad=True)
    m = torch.arange(4).expand(2, 4)
    theirs = detcon.DetConSLoss(temperature=0.1, gather_distributed=False)(v0, v1, m, m)
    ours = detcon_direction(v0, v1, v0, m, m, 0.1) + detcon_direction(v1, v0, v1, m, m, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        _grads(ours, (v0, v1)), _grads(theirs, (v0, v1)), rtol=1e-6, atol=1e-7
    )
