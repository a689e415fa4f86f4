"""Linear soft-target cross-entropy (DINO style) over ``K`` prototypes (the executable spec).

Row ``i`` has student logits ``s_ik = x_i . W_k / tau_s`` and teacher logits ``l_ik``
(``l_ik = y_i . V_k`` from teacher features ``y`` and teacher weight ``V``, or given directly).
The teacher distribution is ``t_i = softmax((l_i - c) / tau_t)`` with centre ``c`` and

    CE_i = -sum_k t_ik log_softmax(s_i)_k = lse_i - sum_k t_ik s_ik

Its gradient w.r.t. ``s_i`` is ``softmax(s_i) - t_i``; the teacher and the centre get none.
``teacher_mean [K]`` is the mean over rows of the raw teacher logits ``l`` (for the centre update).
Rows are processed in chunks so that only a few ``chunk x K`` blocks exist at a time.
"""

from __future__ import annotations

import torch

from .._dtypes import accumulate

CHUNK_ELEMENTS = 1 << 24


def row_chunks(n: int, k: int):
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def acc_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return accumulate(torch.promote_types(student.dtype, teacher.dtype))


def chunk_logits(
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    student_temperature,
    teacher_temperature,
    rows: slice,
    acc: torch.dtype,
):
    """``(s, l, u)`` of a chunk: student logits over tau_s, raw teacher logits, and centred
    teacher logits over tau_t, each ``[rows, K]`` in ``acc``."""
    s = student[rows].to(acc) @ student_weight.to(acc).T / student_temperature
    if teacher_weight is None:
        raw = teacher[rows].to(acc)
    else:
        raw = teacher[rows].to(acc) @ teacher_weight.to(acc).T
    u = raw if center is None else raw - center.to(acc)
    return s, raw, u / teacher_temperature


def linear_soft_ce(
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    student_temperature: float,
    teacher_temperature: float,
):
    """``(row_loss [N], lse [N], teacher_lse [N], teacher_mean [K])`` in the accumulation dtype;
    ``lse`` is the student's log-sum-exp and ``teacher_lse`` that of ``(l - c) / tau_t``."""
    n, k, acc = len(student), len(student_weight), acc_dtype(student, teacher)
    row_loss, lse, teacher_lse = (
        torch.empty(n, device=student.device, dtype=acc) for _ in range(3)
    )
    teacher_sum = torch.zeros(k, device=student.device, dtype=acc)
    for rows in row_chunks(n, k):
        s, raw, u = chunk_logits(
            student,
            student_weight,
            teacher,
            teacher_weight,
            center,
            student_temperature,
            teacher_temperature,
            rows,
            acc,
        )
        lse[rows] = torch.logsumexp(s, dim=1)
        teacher_lse[rows] = torch.logsumexp(u, dim=1)
        t = torch.exp(u - teacher_lse[rows, None])
        row_loss[rows] = lse[rows] - (t * s).sum(1)
        teacher_sum += raw.sum(0)
    return row_loss, lse, teacher_lse, teacher_sum / n


def linear_soft_ce_backward(
    grad_row_loss,
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    lse,
    teacher_lse,
    student_temperature: float,
    teacher_temperature: float,
):
    """``(d_student, d_student_weight)`` in the dtypes of the inputs, recomputing each chunk's
    logits from the saved log-sum-exps."""
    acc = acc_dtype(student, teacher)
    d_student = torch.empty(student.shape, device=student.device, dtype=acc)
    d_weight = torch.zeros(student_weight.shape, device=student.device, dtype=acc)
    weight = student_weight.to(acc)
    for rows in row_chunks(len(student), len(student_weight)):
        s, _, u = chunk_logits(
            student,
            student_weight,
            teacher,
            teacher_weight,
            center,
            student_temperature,
            teacher_temperature,
            rows,
            acc,
        )
        g = torch.exp(s - lse[rows, None]) - torch.exp(u - teacher_lse[rows, None])
        g = g * (grad_row_loss[rows].to(acc) / student_temperature)[:, None]
        d_student[rows] = g @ weight
        d_weight += g.T @ student[rows].to(acc)
    return d_student.to(student.dtype), d_weight.to(student_weight.dtype)
