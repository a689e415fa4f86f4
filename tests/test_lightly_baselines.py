"""The lightly baselines of the benchmarks (benchmarks/lightly_baselines.py) against this
library's ops and against plain formulas of what lightly documents, fp64 on CPU.

lightly comes with the ``bench`` extra (which CI installs); without it these tests skip.
"""

import pytest
import torch
import torch.nn.functional as F

import mgc_kernels
from benchmarks import lightly_baselines

REASON = lightly_baselines.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"lightly baselines: {REASON}")

F64 = torch.float64
N, D, K, Q = 16, 16, 64, 128


def _randn(*shape, grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=F64).requires_grad_(grad)


def _unit(*shape, grad=False, seed=0):
    return F.normalize(_randn(*shape, seed=seed), dim=1).requires_grad_(grad)


# ----------------------------------------------------------------------------- DINO


def _dino_inputs():
    return (
        _randn(N, D, grad=True, seed=1),
        _randn(K, D, grad=True, seed=2),
        _randn(N, D, seed=3),
        _randn(K, D, seed=4),
        _randn(K, seed=5),
    )


# temperatures float32 holds exactly: DINOLoss divides by a float32 teacher temperature
@pytest.mark.parametrize("student_temperature, teacher_temperature", [(0.125, 0.0625), (0.5, 0.25)])
def test_dino_equals_linear_soft_ce(student_temperature, teacher_temperature):
    student, student_weight, teacher, teacher_weight, center = _dino_inputs()
    step = lightly_baselines.dino(
        student,
        student_weight,
        teacher,
        teacher_weight,
        center,
        student_temperature,
        teacher_temperature,
    )
    loss = step()
    grads = torch.autograd.grad(loss, (student, student_weight))
    expected, _ = mgc_kernels.linear_soft_ce(
        student,
        student_weight,
        teacher,
        teacher_weight,
        center=center,
        student_temperature=student_temperature,
        teacher_temperature=teacher_temperature,
        reduction="mean",
    )
    expected_grads = torch.autograd.grad(expected, (student, student_weight))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, expected_grads)


def test_dino_moves_its_centre_not_the_callers():
    student, student_weight, teacher, teacher_weight, center = _dino_inputs()
    given = center.clone()
    step = lightly_baselines.dino(
        student, student_weight, teacher, teacher_weight, center, 0.1, 0.04, center_momentum=0.9
    )
    step()
    moved = 0.9 * given + 0.1 * (teacher @ teacher_weight.T).mean(0)
    torch.testing.assert_close(step.lightly_module.center.view(-1), moved)
    torch.testing.assert_close(center, given)


# ----------------------------------------------------------------------------- SMoG


def _smog_loss(groups, beta, temperature):
    criterion = mgc_kernels.SMoGLoss(
        dim=D,
        num_groups=K,
        temperature=temperature,
        beta=beta,
        symmetric=False,
        reset_every=0,
        bank_size=0,
    ).to(F64)
    criterion.grouping.groups.copy_(groups)
    return criterion


def test_smog_first_step_equals_smog_loss_when_assignments_agree():
    # unit p1 and z2 along p1: each p1 row moves the group z2 picks, by a unit vector
    groups, p1 = _unit(K, D, seed=1), _unit(N, D, grad=True, seed=2)
    z2 = 3 * p1.detach()
    step = lightly_baselines.smog(p1, z2, groups, beta=0.9, temperature=0.1)
    criterion = _smog_loss(groups, beta=0.9, temperature=0.1)
    torch.testing.assert_close(step(), criterion(p1, z2))
    # from the second step on lightly's stored groups are not unit-norm: the values part
    assert not torch.allclose(step(), criterion(p1, z2))


def _cos(x, groups):
    return F.normalize(x, dim=1) @ F.normalize(groups, dim=1).T


def _lightly_smog_formula(p1, z2, groups, beta, temperature):
    """docs/methods.md §3 (SMoG) with lightly's choices: the target is z2's group; each p1 row
    moves the group of ITS OWN argmax cosine by its raw (unnormalised) mean, with gradient; the
    moved groups are stored without re-normalisation. Returns (loss, groups to store)."""
    targets = _cos(z2, groups).argmax(1)
    own = _cos(p1.detach(), groups).argmax(1)
    one_hot = F.one_hot(own, K).to(F64)
    counts = one_hot.sum(0)[:, None]
    means = one_hot.T @ p1 / counts.clamp_min(1)
    moved = torch.where(counts > 0, beta * groups + (1 - beta) * means, groups)
    loss = F.cross_entropy(_cos(p1, moved) / temperature, targets)
    return loss, moved.detach()


def test_smog_follows_lightly_formula_over_two_steps():
    groups, p1, z2 = _unit(K, D, seed=1), _randn(N, D, grad=True, seed=2), _randn(N, D, seed=3)
    step = lightly_baselines.smog(p1, z2, groups, beta=0.9, temperature=0.2)
    for _ in range(2):
        loss = step()
        expected, groups = _lightly_smog_formula(p1, z2, groups, beta=0.9, temperature=0.2)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, p1), torch.autograd.grad(expected, p1))
    torch.testing.assert_close(step.lightly_module.group_features.data, groups)


def test_smog_leaves_the_callers_groups_alone():
    groups = _unit(K, D, seed=1)
    given = groups.clone()
    lightly_baselines.smog(_randn(N, D, grad=True), _randn(N, D, seed=3), groups, 0.9, 0.1)()
    torch.testing.assert_close(groups, given)


# SMoGLoss(variant="lightly") against lightly's SMoGPrototypes itself


def _lightly_example_step(prototypes, p1, z2, proj1, temperature):
    """One step as lightly's examples/pytorch/smog.py takes it: targets from the momentum
    projections, groups moved by the online projections, logits of the predictions against the
    moved groups, the moved groups stored, then nn.CrossEntropyLoss."""
    assignments = prototypes.assign_groups(z2)
    moved = prototypes.get_updated_group_features(proj1)
    logits = prototypes(p1, moved, temperature=temperature)
    prototypes.set_group_features(moved)
    return F.cross_entropy(logits, assignments)


def _lightly_variant_pair(dim, groups, beta, temperature, dtype):
    from lightly.models.modules.heads import SMoGPrototypes

    criterion = mgc_kernels.SMoGLoss(
        dim=dim,
        num_groups=len(groups),
        temperature=temperature,
        beta=beta,
        reset_every=0,
        bank_size=0,
        variant="lightly",
    ).to(dtype)
    criterion.grouping.groups.copy_(groups)
    prototypes = SMoGPrototypes(groups.detach().clone(), beta=beta).to(dtype)
    return criterion, prototypes


# (dtype, loss/gradient rtol, atol, group atol): fp64 to the last bits; fp32 within a few ulps
# (the library sums each group's rows with one index_add, lightly with a mean per group)
PRECISIONS = [
    pytest.param(F64, 1e-12, 1e-15, 1e-14, id="fp64"),
    pytest.param(torch.float32, 2e-6, 1e-8, 5e-7, id="fp32"),
]


@pytest.mark.parametrize("dtype, rtol, atol, group_atol", PRECISIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smog_lightly_variant_equals_lightly(dtype, rtol, atol, group_atol, seed):
    n, dim, groups_count = 48, 32, 20
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=F64)).to(dtype)

    # lightly's example starts from torch.rand rows, not normalised
    groups = torch.rand(groups_count, dim, generator=generator, dtype=F64).to(dtype)
    criterion, prototypes = _lightly_variant_pair(dim, groups, 0.9, 0.2, dtype)
    for _ in range(3):  # the groups carry over: from step 2 on they are not unit-norm
        p1, proj1 = draw(n, dim).requires_grad_(), draw(n, dim, scale=4.0).requires_grad_()
        z2 = draw(n, dim)
        expected = _lightly_example_step(prototypes, p1, z2, proj1, 0.2)
        loss = criterion(p1, z2, proj1=proj1)
        assert loss.dtype == dtype
        torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
        got = torch.autograd.grad(loss, (p1, proj1))
        want = torch.autograd.grad(expected, (p1, proj1))
        assert want[1].abs().sum() > 0
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
        torch.testing.assert_close(
            criterion.group_features, prototypes.group_features.data, rtol=0, atol=group_atol
        )


def test_smog_lightly_variant_at_example_sizes():
    """lightly's example sizes (300 groups, 128-d, batch 256), fp32, one group state carried
    over five steps, with batch-norm-like projections and predictions near them."""
    generator = torch.Generator().manual_seed(7)
    groups = torch.rand(300, 128, generator=generator)
    criterion, prototypes = _lightly_variant_pair(128, groups, 0.99, 0.1, torch.float32)
    for _ in range(5):
        proj1 = torch.randn(256, 128, generator=generator).requires_grad_()
        p1 = (proj1.detach() + 0.5 * torch.randn(256, 128, generator=generator)).requires_grad_()
        z2 = proj1.detach() + 0.5 * torch.randn(256, 128, generator=generator)
        expected = _lightly_example_step(prototypes, p1, z2, proj1, 0.1)
        loss = criterion(p1, z2, proj1=proj1)
        torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-8)
        for g, w in zip(
            torch.autograd.grad(loss, (p1, proj1)), torch.autograd.grad(expected, (p1, proj1))
        ):
            torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(
            criterion.group_features, prototypes.group_features.data, rtol=0, atol=5e-7
        )


def test_smog_lightly_variant_with_proj1_p1_is_the_baseline_wrapper():
    # benchmarks/lightly_baselines.smog moves the groups with p1 itself
    groups, p1, z2 = _unit(K, D, seed=1), _randn(N, D, grad=True, seed=2), _randn(N, D, seed=3)
    step = lightly_baselines.smog(p1, z2, groups, beta=0.9, temperature=0.2)
    criterion, _ = _lightly_variant_pair(D, groups, 0.9, 0.2, F64)
    for _ in range(2):
        expected, loss = step(), criterion(p1, z2, proj1=p1)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.autograd.grad(loss, p1), torch.autograd.grad(expected, p1))
    torch.testing.assert_close(criterion.group_features, step.lightly_module.group_features.data)


def test_smog_lightly_variant_initial_groups_are_the_examples():
    # examples/pytorch/smog.py: SMoGPrototypes(group_features=torch.rand(n_groups, 128), ...)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        example = torch.rand(300, 128)
    criterion = mgc_kernels.SMoGLoss(dim=128, num_groups=300, variant="lightly", seed=5)
    assert torch.equal(criterion.group_features, example)


# ----------------------------------------------------------------------------- NTXent + queue


def _moco_formula(q, k, bank, temperature):
    """CE of [q_i . k_i, q_i . bank] / T against column 0, normalised q and k (bank as stored)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def test_ntxent_queue_is_moco_over_the_bank():
    q, k, queue = _randn(N, D, grad=True, seed=1), _randn(N, D, seed=2), _randn(Q, D, seed=3)
    step = lightly_baselines.ntxent_queue(q, k, queue, temperature=0.2)
    bank = F.normalize(queue, dim=1)
    torch.testing.assert_close(step(), _moco_formula(q, k, bank, 0.2))
    # the first call enqueued the normalised keys at the front of the ring
    bank = torch.cat([F.normalize(k, dim=1), bank[N:]])
    torch.testing.assert_close(step(), _moco_formula(q, k, bank, 0.2))
    memory = step.lightly_module.memory_bank
    assert memory.bank.shape == (Q, D)
    assert int(memory.bank_ptr) == 2 * N


def test_ntxent_queue_gradient_reaches_q():
    q, k, queue = _randn(N, D, grad=True, seed=1), _randn(N, D, seed=2), _randn(Q, D, seed=3)
    loss = lightly_baselines.ntxent_queue(q, k, queue, temperature=0.2)()
    (grad,) = torch.autograd.grad(loss, q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- DetConB


def _detconb_formula(q, k, temperature):
    """DetConB with mask id = region index: per direction, anchor row i of one view (its
    prediction) against the targets of the other view (column i is the positive) and of its own
    view without row i, hard-label CE averaged over rows; the two directions summed."""

    def direction(pred, other, same):
        pred = F.normalize(pred, dim=1)
        other, same = F.normalize(other.detach(), dim=1), F.normalize(same.detach(), dim=1)
        own = (pred @ same.T).masked_fill(torch.eye(len(pred), dtype=torch.bool), float("-inf"))
        logits = torch.cat([pred @ other.T, own], 1) / temperature
        return F.cross_entropy(logits, torch.arange(len(pred)))

    return direction(q, k, q) + direction(k, q, k)


@pytest.mark.parametrize("batch, regions", [(4, 4), (2, 8), (3, 1)])
def test_detconb_equals_formula(batch, regions):
    q = _randn(batch * regions, D, grad=True, seed=1)
    k = _randn(batch * regions, D, grad=True, seed=2)
    loss = lightly_baselines.detconb(q, k, batch, regions, temperature=0.1)()
    expected = _detconb_formula(q, k, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (q, k))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (q, k)))


def test_detconb_refuses_wrong_shapes():
    q = _randn(12, D, grad=True)
    with pytest.raises(ValueError, match="batch \\* regions"):
        lightly_baselines.detconb(q, q, 4, 4, temperature=0.1)
