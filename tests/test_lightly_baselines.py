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
    return (_randn(N, D, grad=True, seed=1), _randn(K, D, grad=True, seed=2),
            _randn(N, D, seed=3), _randn(K, D, seed=4), _randn(K, seed=5))


# temperatures float32 holds exactly: DINOLoss divides by a float32 teacher temperature
@pytest.mark.parametrize("student_temperature, teacher_temperature", [(0.125, 0.0625),
                                                                      (0.5, 0.25)])
def test_dino_equals_linear_soft_ce(student_temperature, teacher_temperature):
    student, student_weight, teacher, teacher_weight, center = _dino_inputs()
    step = lightly_baselines.dino(student, student_weight, teacher, teacher_weight, center,
                                  student_temperature, teacher_temperature)
    loss = step()
    grads = torch.autograd.grad(loss, (student, student_weight))
    expected, _ = mgc_kernels.linear_soft_ce(
        student, student_weight, teacher, teacher_weight, center=center,
        student_temperature=student_temperature, teacher_temperature=teacher_temperature,
        reduction="mean")
    expected_grads = torch.autograd.grad(expected, (student, student_weight))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, expected_grads)


def test_dino_moves_its_centre_not_the_callers():
    student, student_weight, teacher, teacher_weight, center = _dino_inputs()
    given = center.clone()
    step = lightly_baselines.dino(student, student_weight, teacher, teacher_weight, center,
                                  0.1, 0.04, center_momentum=0.9)
    step()
    moved = 0.9 * given + 0.1 * (teacher @ teacher_weight.T).mean(0)
    torch.testing.assert_close(step.lightly_module.center.view(-1), moved)
    torch.testing.assert_close(center, given)


# ----------------------------------------------------------------------------- SMoG

def _smog_loss(groups, beta, temperature):
    criterion = mgc_kernels.SMoGLoss(dim=D, num_groups=K, temperature=temperature, beta=beta,
                                     symmetric=False, reset_every=0, bank_size=0).to(F64)
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
        torch.testing.assert_close(torch.autograd.grad(loss, p1),
                                   torch.autograd.grad(expected, p1))
    torch.testing.assert_close(step.lightly_module.group_features.data, groups)


def test_smog_leaves_the_callers_groups_alone():
    groups = _unit(K, D, seed=1)
    given = groups.clone()
    lightly_baselines.smog(_randn(N, D, grad=True), _randn(N, D, seed=3), groups, 0.9, 0.1)()
    torch.testing.assert_close(groups, given)


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
