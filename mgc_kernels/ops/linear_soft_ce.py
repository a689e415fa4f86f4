"""``linear_soft_ce``: DINO-style cross-entropy of a linear student head against a centred,
sharpened teacher distribution over ``K`` prototypes, without storing the ``N x K`` logits."""

from __future__ import annotations

import torch

from .. import _checks, backends
from ..options import REDUCTIONS
from ..reference import linear_soft_ce as reference

backends.register("linear_soft_ce", "torch")(reference.linear_soft_ce)
backends.register("linear_soft_ce_backward", "torch")(reference.linear_soft_ce_backward)
backends.register_lazy(
    "linear_soft_ce", "triton", "mgc_kernels.triton.linear_soft_ce:linear_soft_ce"
)
backends.register_lazy(
    "linear_soft_ce_backward", "triton", "mgc_kernels.triton.linear_soft_ce:linear_soft_ce_backward"
)


@torch.library.custom_op("mgc_kernels::linear_soft_ce", mutates_args=())
def _linear_soft_ce(
    student: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    center: torch.Tensor | None,
    student_temperature: float,
    teacher_temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.call(
        "linear_soft_ce",
        backend,
        student,
        student_weight,
        teacher,
        teacher_weight,
        center,
        student_temperature,
        teacher_temperature,
    )


@_linear_soft_ce.register_fake
def _(
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    student_temperature,
    teacher_temperature,
    backend,
):
    acc = reference.acc_dtype(student, teacher)
    n, k = student.shape[0], student_weight.shape[0]
    return (*(student.new_empty(n, dtype=acc) for _ in range(3)), student.new_empty(k, dtype=acc))


@torch.library.custom_op("mgc_kernels::linear_soft_ce_backward", mutates_args=())
def _linear_soft_ce_backward(
    grad_row_loss: torch.Tensor,
    student: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    center: torch.Tensor | None,
    lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.call(
        "linear_soft_ce_backward",
        backend,
        grad_row_loss,
        student,
        student_weight,
        teacher,
        teacher_weight,
        center,
        lse,
        teacher_lse,
        student_temperature,
        teacher_temperature,
    )


@_linear_soft_ce_backward.register_fake
def _(
    grad_row_loss,
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    lse,
    teacher_lse,
    student_temperature,
    teacher_temperature,
    backend,
):
    return torch.empty_like(student), torch.empty_like(student_weight)


def _setup_context(ctx, inputs, output):
    (
        student,
        student_weight,
        teacher,
        teacher_weight,
        center,
        ctx.student_temperature,
        ctx.teacher_temperature,
        ctx.backend,
    ) = inputs
    ctx.save_for_backward(
        student, student_weight, teacher, teacher_weight, center, output[1], output[2]
    )


def _backward(ctx, grad_row_loss, grad_lse, grad_teacher_lse, grad_teacher_mean):
    d_student, d_weight = _linear_soft_ce_backward(
        grad_row_loss.contiguous(),
        *ctx.saved_tensors,
        ctx.student_temperature,
        ctx.teacher_temperature,
        ctx.backend,
    )
    return d_student, d_weight, None, None, None, None, None, None


_linear_soft_ce.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(student, student_weight, teacher, teacher_weight, center) -> None:
    """Shapes, dtypes and devices of the op's tensors (see :func:`linear_soft_ce`)."""
    _checks.float_tensor("student", student, ndim=2, kind=" ([N, D] student features)")
    _checks.float_tensor(
        "student_weight", student_weight, ndim=2, kind=" ([K, D] student prototypes)"
    )
    _checks.dim_size(
        "student_weight", student_weight, 1, student.shape[1], "the feature width D of student"
    )
    _checks.same_dtype("student_weight", student_weight, "student", student)
    n, k = student.shape[0], student_weight.shape[0]
    if n < 1 or k < 1:
        raise ValueError(
            f"student needs at least one row and student_weight at least one "
            f"prototype, got {_checks.describe(student)} and "
            f"{_checks.describe(student_weight)}"
        )
    if teacher_weight is None:
        _checks.float_tensor(
            "teacher", teacher, ndim=2, kind=" ([N, K] teacher logits, as teacher_weight is None)"
        )
        if tuple(teacher.shape) != (n, k):
            raise ValueError(
                f"teacher must be [N, K] = [{n}, {k}] teacher logits (one row per "
                "student row, one column per prototype of student_weight) when "
                f"teacher_weight is None, got {_checks.describe(teacher)}"
            )
    else:
        _checks.float_tensor("teacher", teacher, ndim=2, kind=" ([N, D_t] teacher features)")
        _checks.dim_size("teacher", teacher, 0, n, "one row per student row")
        _checks.float_tensor(
            "teacher_weight", teacher_weight, ndim=2, kind=" ([K, D_t] teacher prototypes)"
        )
        _checks.dim_size(
            "teacher_weight", teacher_weight, 0, k, "the number of prototypes K of student_weight"
        )
        _checks.dim_size(
            "teacher_weight",
            teacher_weight,
            1,
            teacher.shape[1],
            "the feature width D_t of teacher",
        )
        _checks.same_dtype("teacher_weight", teacher_weight, "teacher", teacher)
    if center is not None:
        _checks.float_tensor("center", center, ndim=1, kind=" ([K] teacher centre)")
        _checks.dim_size("center", center, 0, k, "the number of prototypes K")
    _checks.same_device(
        student=student,
        student_weight=student_weight,
        teacher=teacher,
        teacher_weight=teacher_weight,
        center=center,
    )


def linear_soft_ce(
    student: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    *,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    center: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``softmax(student @ student_weight.T / tau_s)`` against the teacher
    distribution ``t_i = softmax((l_i - center) / tau_t)`` over ``K`` prototypes.

    ``l`` is ``teacher @ teacher_weight.T`` (teacher features ``[N, D_t]``, teacher prototypes
    ``[K, D_t]``; computed tile by tile by the fused backend, never stored) or, when
    ``teacher_weight`` is None, ``teacher`` itself (precomputed logits ``[N, K]``). Row ``i``'s
    loss is ``CE_i = lse_k(s_ik) - sum_k t_ik s_ik`` with
    ``s = student @ student_weight.T / tau_s``.

    Gradients flow to ``student`` and ``student_weight`` only (``dlogit = softmax - t`` in
    fp32); the teacher and the centre are constants.

    Returns ``(loss, teacher_mean)``: ``loss`` (fp32; fp64 for fp64 inputs) is the mean of
    ``CE_i`` over rows (``reduction="mean"``), their sum (``"sum"``) or the ``[N]`` values
    (``"none"``); ``teacher_mean [K]`` is the mean over rows of the raw teacher logits ``l``
    (before centring), detached, for the centre update ``c <- m c + (1 - m) teacher_mean``.
    """
    check_inputs(student, student_weight, teacher, teacher_weight, center)
    student_temperature = _checks.positive("student_temperature", student_temperature)
    teacher_temperature = _checks.positive("teacher_temperature", teacher_temperature)
    _checks.choice("reduction", reduction, REDUCTIONS)
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    backend = backends.resolve("linear_soft_ce", backend, student.device, dtype)
    acc = reference.acc_dtype(student, teacher)
    teacher = teacher.detach().contiguous()
    teacher_weight = None if teacher_weight is None else teacher_weight.detach().contiguous()
    # a private copy ([K], cheap): callers update their centre in place right after the
    # forward (DINO does), and the backward needs the centre the forward used
    center = None if center is None else center.detach().to(acc, copy=True).contiguous()
    row_loss, _, _, teacher_mean = _linear_soft_ce(
        student.contiguous(),
        student_weight.contiguous(),
        teacher,
        teacher_weight,
        center,
        student_temperature,
        teacher_temperature,
        backend,
    )
    if reduction == "mean":
        loss = row_loss.mean()
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss
    return loss, teacher_mean.detach()
