"""SMoGLoss / SMoGGroups against formulas written out here: assignment, the synchronous momentum
update, the loss and its gradients, the k-means reset, the state round trip and two ranks; and
``variant="lightly"`` against lightly's step written out here (tests/test_lightly_baselines.py
checks it against lightly's own code)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from _distributed import run_ranks
from mgc_kernels.losses import smog
from mgc_kernels.losses.smog import FeatureBank, SMoGGroups, SMoGLoss, spherical_kmeans


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def randn(gen, *shape, grad=False):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)


def direct_step(groups, p1, z2, p2, z1, beta, tau, update=True):
    """One SMoG step written out: assignment with the old groups, a per-group loop for the
    momentum update over the rows of both directions, then cross-entropy on the logits."""
    old = unit(groups)
    a2 = (unit(z2) @ old.T).argmax(1)
    directions = [(p1, a2)]
    if p2 is not None:
        a1 = (unit(z1) @ old.T).argmax(1)
        directions.append((p2, a1))
    new = old.clone()
    if update:
        rows = [(unit(p.detach()[i]), int(a[i])) for p, a in directions for i in range(len(p))]
        for k in sorted({k for _, k in rows}):
            members = torch.stack([x for x, j in rows if j == k])
            moved = beta * old[k] + (1 - beta) * members.mean(0)
            new[k] = moved / moved.norm()
    losses = [F.cross_entropy(unit(p) @ new.T / tau, a) for p, a in directions]
    return sum(losses) / len(losses), new, [a for _, a in directions]


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_loss_and_gradients_equal_direct_formula(symmetric):
    gen = torch.Generator().manual_seed(0)
    crit = SMoGLoss(
        dim=6,
        num_groups=5,
        temperature=0.2,
        beta=0.7,
        reset_every=0,
        bank_size=0,
        symmetric=symmetric,
    ).double()
    crit.grouping.groups.copy_(unit(randn(gen, 5, 6)))
    start = crit.group_features.clone()
    for _ in range(3):  # the groups carry over from step to step
        p1, p2 = randn(gen, 12, 6, grad=True) * 3, randn(gen, 12, 6, grad=True)
        z2, z1 = randn(gen, 12, 6), randn(gen, 12, 6)
        args = (p1, z2, p2, z1) if symmetric else (p1, z2)
        expected, groups, targets = direct_step(
            start, *args, *(() if symmetric else (None, None)), beta=0.7, tau=0.2
        )
        assert len(set(targets[0].tolist())) > 1
        loss = crit(*args)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(crit.group_features, groups, rtol=0, atol=1e-14)
        leaves = [p1, p2] if symmetric else [p1]
        for got, want in zip(
            torch.autograd.grad(loss, leaves, retain_graph=True),
            torch.autograd.grad(expected, leaves),
        ):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        start = groups


def test_groups_and_momentum_features_get_no_gradient():
    gen = torch.Generator().manual_seed(1)
    crit = SMoGLoss(dim=4, num_groups=3, reset_every=0, bank_size=0, symmetric=False).double()
    p1, z2 = randn(gen, 5, 4, grad=True), randn(gen, 5, 4, grad=True)
    loss = crit(p1, z2)
    assert not crit.group_features.requires_grad
    assert torch.autograd.grad(loss, z2, allow_unused=True)[0] is None


def test_float32_input_matches_float64_formula():
    gen = torch.Generator().manual_seed(2)
    crit = SMoGLoss(dim=8, num_groups=7, reset_every=0, bank_size=0)
    groups = crit.group_features.double().clone()
    p1, z2, p2, z1 = (randn(gen, 10, 8) for _ in range(4))
    expected, new, _ = direct_step(groups, p1, z2, p2, z1, beta=0.99, tau=0.1)
    loss = crit(p1.float(), z2.float(), p2.float(), z1.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crit.group_features.double(), new, rtol=0, atol=1e-6)


def test_eval_mode_leaves_the_state_alone():
    gen = torch.Generator().manual_seed(3)
    crit = SMoGLoss(dim=4, num_groups=3, reset_every=1, bank_size=8).double().eval()
    before = copy.deepcopy(crit.state_dict())
    p1, z2, p2, z1 = (randn(gen, 6, 4) for _ in range(4))
    expected, _, _ = direct_step(before["grouping.groups"], p1, z2, p2, z1, 0.99, 0.1, update=False)
    torch.testing.assert_close(crit(p1, z2, p2, z1), expected, rtol=1e-12, atol=0)
    for key, value in crit.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not crit.needs_reset


# ----------------------------------------------------------------------------- variant="lightly"


def lightly_direct_step(groups, p1, z2, proj1, beta, tau, update=True):
    """lightly's SMoG step written out row by row: targets are z2's nearest groups (cosine, the
    groups before the step); each proj1 row moves ITS OWN nearest group by the raw mean of the
    rows that chose it, with gradient, without normalising; CE of the cosine logits of p1
    against the moved groups. Returns (loss, moved groups)."""

    def cos(x, g):
        return unit(x) @ unit(g).T

    targets = cos(z2, groups).argmax(1)
    rows = list(groups.unbind(0))
    if update:
        own = cos(proj1.detach(), groups).argmax(1).tolist()
        for k in range(len(groups)):
            members = [proj1[i] for i in range(len(proj1)) if own[i] == k]
            if members:
                rows[k] = beta * groups[k] + (1 - beta) * sum(members) / len(members)
    moved = torch.stack(rows)
    logits = cos(p1, moved) / tau
    picked = logits[torch.arange(len(p1)), targets]
    return (torch.logsumexp(logits, 1) - picked).mean(), moved


def lightly_crit(dim, num_groups, **kwargs):
    kwargs = dict(reset_every=0, bank_size=0, variant="lightly", **kwargs)
    return SMoGLoss(dim=dim, num_groups=num_groups, **kwargs).double()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lightly_variant_equals_direct_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    crit = lightly_crit(8, 6, temperature=0.2, beta=0.7)
    groups = crit.group_features.clone()  # lightly's init: torch.rand rows, not unit
    own_differs = 0
    for _ in range(3):  # the groups carry over from step to step
        p1 = randn(gen, 20, 8, grad=True)
        proj1 = (randn(gen, 20, 8) * 3).requires_grad_()
        z2 = randn(gen, 20, 8)
        expected, groups = lightly_direct_step(groups, p1, z2, proj1, beta=0.7, tau=0.2)
        own_differs += int(
            (
                (unit(proj1) @ unit(crit.group_features).T).argmax(1)
                != (unit(z2) @ unit(crit.group_features).T).argmax(1)
            ).sum()
        )
        loss = crit(p1, z2, proj1=proj1)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(crit.group_features, groups.detach(), rtol=0, atol=1e-14)
        got = torch.autograd.grad(loss, (p1, proj1))
        want = torch.autograd.grad(expected, (p1, proj1))
        assert got[1].abs().sum() > 0  # the gradient reaches proj1 through the moved groups
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
        groups = groups.detach()
    assert own_differs > 0  # the update's own assignment is not the target's
    assert not torch.allclose(groups.norm(dim=1), torch.ones(6, dtype=torch.float64))


def test_lightly_variant_float32_matches_float64_formula():
    gen = torch.Generator().manual_seed(4)
    crit = SMoGLoss(dim=16, num_groups=12, reset_every=0, bank_size=0, variant="lightly")
    groups = crit.group_features.double().clone()
    p1, z2, proj1 = randn(gen, 24, 16), randn(gen, 24, 16), randn(gen, 24, 16)
    expected, groups = lightly_direct_step(groups, p1, z2, proj1, beta=0.99, tau=0.1)
    loss = crit(p1.float(), z2.float(), proj1=proj1.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crit.group_features.double(), groups, rtol=0, atol=1e-6)


def test_lightly_variant_initial_groups_are_torch_rand():
    crit = SMoGLoss(dim=5, num_groups=7, variant="lightly", seed=3)
    expected = torch.rand(7, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(crit.group_features, expected)
    assert torch.equal(SMoGGroups(7, dim=5, seed=3, init="uniform").groups, expected)
    default = SMoGLoss(dim=5, num_groups=7)
    assert crit.grouping.init == "uniform" and default.grouping.init == "normal"
    assert not crit.symmetric and default.symmetric


def test_lightly_variant_eval_mode_leaves_the_state_alone():
    gen = torch.Generator().manual_seed(5)
    crit = SMoGLoss(dim=4, num_groups=3, reset_every=1, bank_size=8, variant="lightly")
    crit = crit.double().eval()
    before = copy.deepcopy(crit.state_dict())
    p1, z2 = randn(gen, 6, 4), randn(gen, 6, 4)
    expected, _ = lightly_direct_step(
        before["grouping.groups"], p1, z2, None, 0.99, 0.1, update=False
    )
    torch.testing.assert_close(crit(p1, z2), expected, rtol=1e-12, atol=0)  # no proj1 needed
    for key, value in crit.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_lightly_variant_banks_the_online_projections_and_resets():
    gen = torch.Generator().manual_seed(6)
    crit = SMoGLoss(
        dim=8, num_groups=4, reset_every=2, bank_size=32, kmeans_iters=5, seed=11, variant="lightly"
    ).double()
    banked, flags = [], []
    for _ in range(2):
        p1, z2, proj1 = randn(gen, 6, 8), randn(gen, 6, 8), randn(gen, 6, 8)
        crit(p1, z2, proj1=proj1)
        banked.append(proj1)
        flags.append(crit.needs_reset)
    torch.testing.assert_close(crit.bank.valid(), unit(torch.cat(banked)), rtol=0, atol=1e-15)
    expected, _ = spherical_kmeans(crit.bank.valid(), 4, 5, seed=11 + 2)
    assert torch.equal(crit.group_features, expected)
    assert flags == [False, True]


def test_explicit_smog_variant_is_the_default():
    gen = torch.Generator().manual_seed(7)
    inputs = [randn(gen, 10, 6) for _ in range(4)]
    a = SMoGLoss(dim=6, num_groups=5, reset_every=0, bank_size=0).double()
    b = SMoGLoss(dim=6, num_groups=5, reset_every=0, bank_size=0, variant="smog").double()
    assert torch.equal(a(*inputs), b(*inputs))
    assert torch.equal(a.group_features, b.group_features)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="Lightly"), "variant must be one of"),
        (dict(variant="paper"), "variant must be one of"),
        (dict(variant=None), "variant must be one of"),
        (dict(variant=1), "variant must be one of"),
        (dict(variant="lightly", symmetric=True), "symmetric"),
        (dict(variant="lightly", gather_distributed=True), "gather_distributed"),
    ],
)
def test_bad_variant(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SMoGLoss(dim=4, num_groups=3, reset_every=0, bank_size=0, **kwargs)


def test_bad_lightly_inputs():
    x = torch.randn(5, 4)
    crit = SMoGLoss(dim=4, num_groups=3, reset_every=0, bank_size=0, variant="lightly")
    with pytest.raises(ValueError, match="needs proj1="):
        crit(x, x)
    with pytest.raises(ValueError, match="proj1"):
        crit(x, x, proj1=torch.randn(6, 4))
    with pytest.raises(ValueError, match="proj1"):
        crit(x, x, proj1=torch.randn(5, 3))
    with pytest.raises(ValueError, match="only used with symmetric=True"):
        crit(x, x, x, x, proj1=x)
    smog_default = SMoGLoss(dim=4, num_groups=3, reset_every=0, bank_size=0, symmetric=False)
    with pytest.raises(ValueError, match="proj1 is only used with variant='lightly'"):
        smog_default(x, x, proj1=x)
    with pytest.raises(ValueError, match="init must be one of"):
        SMoGGroups(3, dim=4, init="rand")


# ----------------------------------------------------------------------------- the groups


def test_assignment_is_argmax_cosine():
    groups = SMoGGroups(num_groups=4, dim=2).double()
    angles = torch.tensor([0.0, 0.5, 1.0, 1.5]) * torch.pi  # 0, 90, 180, 270 degrees
    groups.groups.copy_(torch.stack([angles.cos(), angles.sin()], 1).double())
    x = torch.tensor([[10.0, 1.0], [0.1, 0.3], [-5.0, -0.1], [1.0, -9.0], [0.001, 0.0]]).double()
    assert groups.assign(x).tolist() == [0, 1, 2, 3, 0]
    assert groups.assign(x).dtype == torch.long


def test_assignment_in_chunks_equals_one_matrix(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    groups = SMoGGroups(num_groups=7, dim=5).double()
    x = randn(gen, 40, 5)
    expected = (unit(x) @ groups.groups.T).argmax(1)
    monkeypatch.setattr(smog, "_CHUNK_ELEMENTS", 20)  # 2 rows a chunk
    assert torch.equal(groups.assign(x), expected)


def test_momentum_update_known_answer():
    groups = SMoGGroups(num_groups=3, dim=2, beta=0.5).double()
    groups.groups.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    # group 0: (0, 3) and (4, 0) are averaged as unit vectors: (0.5, 0.5);
    # 0.5 * (1, 0) + 0.5 * (0.5, 0.5) = (0.75, 0.25) -> (3, 1) / sqrt(10)
    # group 1: 0.5 * (0, 1) + 0.5 * (1, 0) -> (1, 1) / sqrt(2); group 2 has no member: unchanged
    x = torch.tensor([[0.0, 3.0], [2.0, 0.0], [4.0, 0.0]]).double()
    groups.update(x, torch.tensor([0, 1, 0]))
    expected = torch.tensor(
        [[3 / 10**0.5, 1 / 10**0.5], [2**-0.5, 2**-0.5], [-1.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(groups.groups, expected, rtol=0, atol=1e-15)


def test_momentum_update_random_against_loop():
    gen = torch.Generator().manual_seed(5)
    groups = SMoGGroups(num_groups=6, dim=4, beta=0.9).double()
    old = groups.groups.clone()
    x, a = randn(gen, 20, 4), torch.randint(0, 4, (20,), generator=gen)  # groups 4, 5 absent
    groups.update(x, a)
    for k in range(6):
        if (a == k).any():
            moved = 0.9 * old[k] + 0.1 * unit(x[a == k]).mean(0)
            torch.testing.assert_close(groups.groups[k], unit(moved), rtol=0, atol=1e-15)
        else:
            assert torch.equal(groups.groups[k], old[k])


def test_feature_bank_is_a_ring_of_the_last_rows():
    bank = FeatureBank(5, dim=2).double()
    rows = unit(torch.randn(8, 2, generator=torch.Generator().manual_seed(6)).double())
    bank.push(rows[:3] * 7)
    torch.testing.assert_close(bank.valid(), rows[:3])
    bank.push(rows[3:8])  # wraps: rows 5, 6, 7 overwrite rows 0, 1, 2
    torch.testing.assert_close(bank.features, rows[[5, 6, 7, 3, 4]])
    assert (int(bank.ptr), int(bank.count)) == (3, 5)
    bank.push(torch.cat([rows, rows]))  # more rows than the bank: the last 5 are kept
    torch.testing.assert_close(bank.features, rows[[5, 6, 7, 3, 4]])
    assert (int(bank.ptr), int(bank.count)) == (3, 5)


# ----------------------------------------------------------------------------- k-means reset


def blobs(gen, per_blob=40, dim=16, count=5, noise=0.05):
    labels = torch.arange(count).repeat_interleave(per_blob)
    centres = torch.eye(dim, dtype=torch.float64)[:count]
    return centres[labels] + noise * randn(gen, len(labels), dim), labels, centres


def test_kmeans_reset_recovers_separated_blobs_and_is_deterministic():
    gen = torch.Generator().manual_seed(7)
    x, labels, centres = blobs(gen)
    groups = SMoGGroups(num_groups=5, dim=16).double()
    assign = groups.reset(x, iters=10, seed=3)
    # every blob is one group and every group one blob
    mapping = {int(labels[i]): int(assign[i]) for i in range(len(x))}
    assert sorted(mapping.values()) == [0, 1, 2, 3, 4]
    assert all(int(assign[i]) == mapping[int(labels[i])] for i in range(len(x)))
    for blob, group in mapping.items():
        assert float(groups.groups[group] @ centres[blob]) > 0.99
    torch.testing.assert_close(groups.groups.norm(dim=1), torch.ones(5, dtype=torch.float64))
    again = SMoGGroups(num_groups=5, dim=16).double()
    again.reset(x, iters=10, seed=3)
    assert torch.equal(again.groups, groups.groups)
    by_generator = SMoGGroups(num_groups=5, dim=16).double()
    by_generator.reset(x, iters=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(by_generator.groups, groups.groups)


def test_kmeans_reseeds_empty_clusters_with_the_worst_fitting_points():
    gen = torch.Generator().manual_seed(8)
    e = torch.eye(6, dtype=torch.float64)
    x = torch.cat(
        [e[0] + 0.05 * randn(gen, 10, 6), e[1] + 0.05 * randn(gen, 10, 6), e[2:3] * 4, e[3:4]]
    )  # two outliers, orthogonal to both blobs
    away = unit(-(e[0] + e[1]))
    # centres 2 and 3 are far from every point: both are empty after the first assignment
    init = torch.stack([e[0], e[1], away, away])
    centres, assign = spherical_kmeans(x, 4, iters=1, init=init)
    assert {tuple(c) for c in centres[2:].tolist()} == {tuple(e[2].tolist()), tuple(e[3].tolist())}
    assert not torch.isnan(centres).any()
    centres, assign = spherical_kmeans(x, 4, iters=5, init=init)
    assert assign[:10].unique().numel() == 1 and assign[10:20].unique().numel() == 1
    assert len(set(assign.tolist())) == 4


def test_kmeans_of_identical_points_stays_finite():
    x = torch.ones(6, 3, dtype=torch.float64)
    centres, assign = spherical_kmeans(x, 3, iters=3, seed=0)
    torch.testing.assert_close(centres, unit(torch.ones(3, 3, dtype=torch.float64)))
    assert assign.unique().numel() == 1


def test_scheduled_reset_clusters_the_bank_and_raises_the_flag():
    gen = torch.Generator().manual_seed(9)
    crit = SMoGLoss(
        dim=8, num_groups=4, reset_every=2, bank_size=32, kmeans_iters=5, seed=11
    ).double()
    flags, banked = [], []
    for step in range(4):
        p1, z2, p2, z1 = (randn(gen, 6, 8) for _ in range(4))
        crit(p1, z2, p2, z1)
        flags.append(crit.needs_reset)
        banked += [z2, z1]  # the bank takes the momentum features, z2 then z1
        if step == 1:
            bank = unit(torch.cat(banked))
            torch.testing.assert_close(crit.bank.valid(), bank, rtol=0, atol=1e-15)
            expected, _ = spherical_kmeans(crit.bank.valid(), 4, 5, seed=11 + 2)
            assert torch.equal(crit.group_features, expected)
    assert flags == [False, True, False, True]
    assert int(crit.iteration) == 4


def test_reset_with_too_few_features_is_a_clear_error():
    groups = SMoGGroups(num_groups=8, dim=4)
    with pytest.raises(ValueError, match="num_groups=8"):
        groups.reset(torch.randn(5, 4))
    with pytest.raises(ValueError, match="num_clusters=8"):
        spherical_kmeans(torch.randn(5, 4), 8)
    crit = SMoGLoss(dim=4, num_groups=10, reset_every=1, bank_size=10)
    with pytest.raises(RuntimeError, match="feature bank holds 4"):
        crit(*(torch.randn(2, 4) for _ in range(4)))


# ----------------------------------------------------------------------------- state


def test_state_dict_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(10)
    kwargs = dict(dim=8, num_groups=4, reset_every=3, bank_size=16, kmeans_iters=4)
    steps = [[torch.randn(6, 8, generator=gen) for _ in range(4)] for _ in range(5)]
    crit = SMoGLoss(**kwargs)
    for inputs in steps[:2]:
        crit(*inputs)
    buffer = io.BytesIO()
    torch.save(crit.state_dict(), buffer)
    resumed = SMoGLoss(**kwargs)
    resumed(*steps[4])  # another history: the load must override groups, bank and counter
    assert not torch.equal(resumed.group_features, crit.group_features)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for inputs in steps[2:]:  # the step at iteration 3 re-clusters
        a, b = crit(*inputs), resumed(*inputs)
        assert torch.equal(a, b)
        assert torch.equal(crit.group_features, resumed.group_features)
        assert crit.needs_reset == resumed.needs_reset
    assert int(resumed.iteration) == 5
    for key, value in crit.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_groups=0), "num_groups"),
        (dict(num_groups=2.5), "num_groups"),
        (dict(dim=0), "dim"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(beta=1.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(reset_every=-1), "reset_every"),
        (dict(bank_size=100), "bank_size"),
        (dict(bank_size=-1, reset_every=0), "bank_size"),
        (dict(kmeans_iters=0), "kmeans_iters"),
        (dict(symmetric="yes"), "symmetric"),
        (dict(seed="a"), "seed"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SMoGLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_groups=-1), "num_groups"),
        (dict(dim=0), "dim"),
        (dict(beta=2), "beta"),
    ],
)
def test_bad_group_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SMoGGroups(**kwargs)


def test_bad_forward_inputs():
    crit = SMoGLoss(dim=4, num_groups=3, reset_every=0, bank_size=0)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="p1"):
        crit(torch.randn(5, 3), x, x, x)
    with pytest.raises(ValueError, match="p1"):
        crit(torch.randn(20), x, x, x)
    with pytest.raises(ValueError, match="z2"):
        crit(x, torch.randn(6, 4), x, x)
    with pytest.raises(ValueError, match="p2"):
        crit(x, x, torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="z1"):
        crit(x, x, x, torch.randn(5, 8))
    with pytest.raises(ValueError, match="p2 and z1 are required"):
        crit(x, x)
    with pytest.raises(ValueError, match="only used with symmetric=True"):
        SMoGLoss(dim=4, num_groups=3, reset_every=0, symmetric=False)(x, x, x, x)
    with pytest.raises(TypeError, match="p1"):
        crit(torch.ones(5, 4, dtype=torch.long), x, x, x)
    groups = SMoGGroups(num_groups=3, dim=4)
    with pytest.raises(ValueError, match="assignments"):
        groups.update(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="assignments"):
        groups.update(x, torch.full((5,), 3))
    with pytest.raises(ValueError, match="features"):
        groups.assign(torch.randn(5, 2))


# ----------------------------------------------------------------------------- two ranks


def _two_rank_steps(rank, world, steps):
    """Every rank builds the full batches from one seed and keeps its half; rank -1 is the one
    process over the whole batch. Runs ``steps`` training steps, the second one re-clustering."""
    gen = torch.Generator().manual_seed(12)
    crit = SMoGLoss(
        dim=6,
        num_groups=5,
        beta=0.8,
        reset_every=2,
        bank_size=40,
        kmeans_iters=4,
        gather_distributed=rank >= 0,
    ).double()
    batch = 8
    part = slice(None) if rank < 0 else slice(rank * batch // world, (rank + 1) * batch // world)
    out = []
    for _ in range(steps):
        full = [randn(gen, batch, 6) for _ in range(4)]
        p1, z2, p2, z1 = (t[part].clone() for t in full)
        p1.requires_grad_(), p2.requires_grad_()
        loss = crit(p1, z2, p2, z1)
        grads = torch.autograd.grad(loss, (p1, p2))
        out.append(
            {
                "loss": loss.detach(),
                "grads": grads,
                "groups": crit.group_features.clone(),
                "bank": crit.bank.valid().clone(),
                "flag": crit.needs_reset,
            }
        )
    return out


def test_two_ranks_equal_one_process_over_the_whole_batch():
    single = _two_rank_steps(-1, 1, 3)
    ranks = run_ranks(_two_rank_steps, 2, 3)
    for step, want in enumerate(single):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert torch.equal(r0["groups"], r1["groups"])  # the ranks agree to the bit
        torch.testing.assert_close(r0["groups"], want["groups"], rtol=0, atol=1e-13)
        assert torch.equal(r0["bank"], want["bank"]) and torch.equal(r1["bank"], want["bank"])
        assert r0["flag"] == r1["flag"] == want["flag"]
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, want["loss"], rtol=1e-12, atol=0)
        for i, g in enumerate(want["grads"]):
            halves = torch.cat([r0["grads"][i], r1["grads"][i]]) / 2
            torch.testing.assert_close(halves, g, rtol=1e-10, atol=1e-14)
    assert [s["flag"] for s in single] == [False, True, False]
