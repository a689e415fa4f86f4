"""Baselines from lightly (https://github.com/lightly-ai/lightly): its comparable losses, called
through lightly's public classes the way a lightly user calls them each training step.

Each public wrapper builds lightly's module once (moved to the inputs' device and dtype) and
returns a zero-argument callable that computes the scalar loss, differentiable w.r.t. the float
inputs that a training step would differentiate. lightly is optional: it is imported inside the
functions only, and :func:`unavailable` says why it cannot be used.

What each wrapper measures, and where its math differs from this library's op beside it:

``ntxent_queue`` -- ``lightly.loss.NTXentLoss(temperature, memory_bank_size=(Q, D))``, the
    MoCo-style memory-bank mode: row ``i`` contrasts ``q_i`` with its own key ``k_i`` (the
    positive) and the ``Q`` bank entries (negatives), ``CE([q_i.k_i, q_i.bank] / T, 0)`` on
    L2-normalised vectors, ``Q + 1`` columns. The bank is filled with the normalised ``queue``
    before timing; each call also writes the normalised ``k`` into the bank (ring buffer of fixed
    size ``Q``), as a user pays. This library's ``info_nce`` beside it contrasts ``q`` with
    ``[k; queue]``: every in-batch key is a column (the other rows' keys are extra negatives),
    ``N + Q`` columns, so the values differ unless ``N == 1``. lightly reads the bank pointer on
    the host (``int(bank_ptr)``) in every forward: one device sync per call, lightly's own.

``detconb`` -- ``lightly.loss.DetConBLoss(temperature, gather_distributed=False)`` on region
    embeddings ``q`` (view 1) and ``k`` (view 2), ``[batch * regions, D]`` reshaped to
    ``[batch, regions, D]``; predictions are ``q``/``k`` and targets their detached copies (BYOL
    style: targets come from the momentum branch, no gradient), mask ids ``arange(regions)`` per
    image, so region ``r`` of view 1 pairs with region ``r`` of view 2. With these masks DetConB
    is, per direction, a hard-label CE over ``2 * batch * regions`` columns (all regions of the
    other view, all regions of the same view except the anchor itself) with the same region of
    the other view as the one positive, averaged over regions; the two directions are SUMMED.
    This library's ``geometric_info_nce`` instead uses overlap-weighted soft targets over the
    ``N`` keys of the other view only, one direction, rows weighted by their total overlap.

``smog`` -- ``lightly.models.modules.heads.SMoGPrototypes(group_features, beta)`` driven as
    lightly's SMoG example drives it, except that the groups are moved by the predictions ``p1``
    where the example moves them by the online projections (the predictor's input; a benchmark
    of the loss step has no predictor): ``assign_groups(z2)``, ``get_updated_group_features(p1)``,
    logits of ``p1`` against the updated groups (``forward(p1, updated, temperature)``),
    ``set_group_features(updated)``, then ``F.cross_entropy(logits, assignments)``. Compared with
    ``mgc_kernels.SMoGLoss(symmetric=False)`` (``SMoGLoss(variant="lightly")`` with
    ``proj1=p1`` is this very step):

    - lightly assigns each ``p1`` row to a group by ITS OWN argmax cosine for the update;
      ``SMoGLoss`` moves the group that the row's momentum feature ``z2`` was assigned to;
    - lightly averages the raw ``p1`` rows and stores ``beta g + (1 - beta) mean`` without
      re-normalising; ``SMoGLoss`` averages L2-normalised rows and stores the normalised result;
    - lightly's updated groups keep the autograd graph of ``p1``, so the gradient also flows
      through the ``(1 - beta)`` share of the update; ``SMoGLoss`` detaches the groups;
    - lightly loops over ``torch.unique(assignments)`` in Python: one host sync per step plus
      a few small kernels per occupied group (that cost is lightly's, and is what is timed).

    The FIRST step's loss values are equal when ``p1`` rows are unit-norm and each ``p1_i`` has
    the same argmax group as ``z2_i`` (the logits normalise the groups, so the missing
    re-normalisation does not matter yet). From the second step on they differ (lightly's stored
    groups are no longer unit-norm, so ``beta`` weighs them differently), as do the gradients.

``dino`` -- ``lightly.loss.DINOLoss`` (``teacher_temp = warmup_teacher_temp``, ``student_temp``,
    ``center_momentum``) with its centre set to ``center``, on logits ``student @
    student_weight.T`` and ``teacher @ teacher_weight.T`` (the last layer of a DINO head; the
    teacher's is computed without gradient, as under a momentum teacher). DINOLoss takes lists
    of ``[N, K]`` views and skips the teacher/student pairs whose view indices are equal, so one
    student view against one teacher view is passed as teacher views ``[T, T]`` and student
    views ``[S]``: the only counted pair is (teacher view 1, student view 0). The duplicate costs
    one extra ``[N, K]`` softmax and leaves the centre update unchanged (the mean of ``[T, T]`` is
    the mean of ``T``). The value and the gradients w.r.t. ``student`` and ``student_weight``
    equal ``mgc_kernels.linear_soft_ce(..., center=center, reduction="mean")``, which never
    stores the ``[N, K]`` logits, up to one rounding: DINOLoss divides by the teacher temperature
    as a float32 tensor, so with fp64 inputs and a temperature that float32 cannot hold exactly
    (0.04) the two differ at the 1e-10 relative level. DINOLoss updates its centre inside the
    forward (timed, as a user pays it), so only the first call uses ``center`` as given.

Each returned callable carries the lightly module it drives as ``step.lightly_module`` (for
inspection: the bank, the groups, the centre).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossStep = Callable[[], torch.Tensor]

__all__ = ["detconb", "dino", "ntxent_queue", "smog", "unavailable"]


def unavailable() -> str | None:
    """None when ``import lightly.loss`` works, else a one-line reason."""
    try:
        import lightly.loss  # noqa: F401
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "lightly":
            return "lightly is not installed: pip install lightly"
        return _first_line(error)
    except Exception as error:  # a broken install must not stop the benchmark
        return _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'import lightly.loss failed'}"


def _like(module: torch.nn.Module, tensor: torch.Tensor) -> torch.nn.Module:
    """The module on ``tensor``'s device, its float buffers in ``tensor``'s dtype (lightly keeps
    them float32, and its einsums refuse mixed dtypes)."""
    return module.to(device=tensor.device, dtype=tensor.dtype)


def _step(run: LossStep, module: torch.nn.Module) -> LossStep:
    """``run`` with the lightly module it drives attached, for inspecting its state."""
    run.lightly_module = module
    return run


def ntxent_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> LossStep:
    """lightly's memory-bank NTXentLoss: ``q [N, D]`` against its key ``k [N, D]`` and the bank,
    filled with ``queue [Q, D]`` (normalised, as lightly stores keys) before the first call."""
    from lightly.loss import NTXentLoss

    size, dim = queue.shape
    loss_fn = _like(NTXentLoss(temperature=temperature, memory_bank_size=(size, dim)), q)
    bank = loss_fn.memory_bank
    with torch.no_grad():
        bank.bank.copy_(F.normalize(queue, dim=1))
        bank.bank_ptr.zero_()

    def step() -> torch.Tensor:
        # the forward also enqueues k (only when q requires grad): the bank stays [Q, D]
        return loss_fn(q, k)

    return _step(step, loss_fn)


def detconb(
    q: torch.Tensor, k: torch.Tensor, batch: int, regions: int, temperature: float
) -> LossStep:
    """lightly's DetConBLoss on region embeddings ``q`` (view 1) and ``k`` (view 2), each
    ``[batch * regions, D]`` row-major per image; region ``r`` of view 1 pairs with region ``r``
    of view 2 of the same image."""
    from lightly.loss import DetConBLoss

    if q.shape != k.shape or q.ndim != 2 or q.shape[0] != batch * regions:
        raise ValueError(
            f"q and k must both be [batch * regions, D] = [{batch * regions}, D], "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    loss_fn = DetConBLoss(temperature=temperature, gather_distributed=False)
    mask_ids = torch.arange(regions, device=q.device).expand(batch, regions)
    per_image = (batch, regions, q.shape[1])

    def step() -> torch.Tensor:
        pred0, pred1 = q.view(per_image), k.view(per_image)
        # BYOL-style targets come from the momentum branch: same values, no gradient
        return loss_fn(pred0, pred1, pred0.detach(), pred1.detach(), mask_ids, mask_ids)

    return _step(step, loss_fn)


def smog(
    p1: torch.Tensor,
    z2: torch.Tensor,
    group_features: torch.Tensor,
    beta: float,
    temperature: float,
) -> LossStep:
    """lightly's SMoGPrototypes as its SMoG example uses them: targets from ``z2 [N, D]``,
    groups (initially ``group_features [K, D]``, copied) moved by ``p1 [N, D]``, then the CE of
    ``p1`` against the moved groups."""
    from lightly.models.modules.heads import SMoGPrototypes

    # a copy: lightly wraps the tensor in a Parameter and replaces its data every step
    prototypes = _like(SMoGPrototypes(group_features.detach().clone(), beta=beta), p1)

    def step() -> torch.Tensor:
        assignments = prototypes.assign_groups(z2)
        updated = prototypes.get_updated_group_features(p1)
        logits = prototypes(p1, updated, temperature=temperature)
        prototypes.set_group_features(updated)
        return F.cross_entropy(logits, assignments)

    return _step(step, prototypes)


def dino(
    student: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weight: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    *,
    center_momentum: float = 0.9,
) -> LossStep:
    """lightly's DINOLoss on one student view ``student @ student_weight.T`` against one teacher
    view ``teacher @ teacher_weight.T`` (``[N, K]`` logits), centre ``center [K]`` at the first
    call."""
    from lightly.loss import DINOLoss

    loss_fn = DINOLoss(
        output_dim=student_weight.shape[0],
        warmup_teacher_temp=teacher_temperature,
        teacher_temp=teacher_temperature,
        student_temp=student_temperature,
        center_momentum=center_momentum,
    )
    loss_fn = _like(loss_fn, student)
    with torch.no_grad():
        loss_fn.center.copy_(center.view(1, 1, -1))

    def step() -> torch.Tensor:
        with torch.no_grad():  # a momentum teacher's head runs without gradient
            teacher_logits = F.linear(teacher, teacher_weight)
        student_logits = F.linear(student, student_weight)
        # DINOLoss skips equal view indices: [T, T] x [S] counts (teacher 1, student 0) only
        return loss_fn([teacher_logits, teacher_logits], [student_logits])

    return _step(step, loss_fn)
