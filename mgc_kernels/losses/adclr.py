"""ADCLR: Accurate and Dense Contrastive Representation Learning (Zhang, Zhu, Zhao, Yan,
ICLR 2023, arXiv:2306.13337)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import _checks, distributed
from ..ops.linear_soft_ce import linear_soft_ce

QUERY_PAIRS = ("cross", "same")


class _Term(NamedTuple):
    """One cross-entropy term of a step on this rank."""

    loss_sum: torch.Tensor  # sum of H over the student rows, with gradient
    teacher_logits: torch.Tensor  # [K] sum of the raw teacher logits over the teacher rows
    student_rows: int
    teacher_rows: int  # distinct teacher rows: the CLS term pairs each with several students


class ADCLRLoss(nn.Module):
    """DINO-style self-distillation on the CLS token plus ADCLR's query tokens.

    Both terms are the cross-entropy ``H(t, s) = -sum_k t_k log softmax(s / tau_s)_k`` of a
    student head output ``s`` against the teacher distribution ``t = softmax((l - c) / tau_t)``
    over ``K`` prototypes, computed by :func:`mgc_kernels.linear_soft_ce` from the features and
    the last-layer weights of the two heads (no ``N x K`` logits are kept):

    * CLS term: mean of ``H`` over the images and over the view pairs ``(a, b)``, teacher global
      view ``a`` in {0, 1} against student view ``b != a`` (all ``V`` student views: the two
      global views, then any local crops, as DINO's multi-crop).
    * query term: mean of ``H`` over the images, the query tokens and both global views, pairing
      query ``j`` of the teacher in view ``a`` with query ``j`` of the student in view ``b``:
      ``b = 1 - a`` for ``query_pairs="cross"`` (the paper's cross-view query contrast, default),
      ``b = a`` for ``"same"``.
    * ``L = L_cls + query_weight * L_query``.

    Separate centres for the CLS and the query outputs (buffers ``center_cls``,
    ``center_query``, saved with the ``state_dict``) are used as they stand, then updated in
    training mode as ``c <- m c + (1 - m) mean(l)`` over the teacher outputs of the step (the
    mean over all ranks when ``torch.distributed`` is initialised: one all-reduce per step).
    The teacher temperature warms up linearly from ``warmup_teacher_temperature`` at epoch 0 to
    ``teacher_temperature`` at epoch ``warmup_teacher_temperature_epochs - 1`` (DINO's
    schedule), constant afterwards; fractional epochs interpolate.

    With ``gather_distributed=True`` the means are normalised by the row counts of all ranks, and
    each rank returns ``world_size x`` its share of the global loss, so that the mean over ranks
    (what DDP's gradient averaging optimises) is the loss of one process over the whole batch
    (equal to the plain per-rank mean when ranks hold equal batches).

    Args:
        num_prototypes: ``K``, the output width of the heads (DINO's default 65536).
        student_temperature: ``tau_s`` (0.1).
        teacher_temperature: ``tau_t`` after the warm-up (0.07).
        warmup_teacher_temperature: ``tau_t`` at epoch 0 (0.04).
        warmup_teacher_temperature_epochs: warm-up length in epochs (30, as DINO); 0 = none.
        center_momentum: ``m`` (0.9).
        query_weight: weight of the query term (1.0).
        query_pairs: ``"cross"`` or ``"same"`` (see above).
        gather_distributed: normalise over the row counts of every rank (see above).
        backend: op backend (``None`` = the library default).
    """

    center_cls: torch.Tensor
    center_query: torch.Tensor

    def __init__(
        self,
        num_prototypes: int = 65536,
        *,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 30,
        center_momentum: float = 0.9,
        query_weight: float = 1.0,
        query_pairs: str = "cross",
        gather_distributed: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.num_prototypes = _checks.integer("num_prototypes", num_prototypes, 1)
        self.student_temperature = _checks.positive("student_temperature", student_temperature)
        self.teacher_temperature = _checks.positive("teacher_temperature", teacher_temperature)
        self.warmup_teacher_temperature = _checks.positive(
            "warmup_teacher_temperature", warmup_teacher_temperature
        )
        self.warmup_teacher_temperature_epochs = _checks.integer(
            "warmup_teacher_temperature_epochs", warmup_teacher_temperature_epochs, 0
        )
        self.center_momentum = _checks.real("center_momentum", center_momentum, 0, 1)
        self.query_weight = _checks.real("query_weight", query_weight, 0, finite=True)
        _checks.choice("query_pairs", query_pairs, QUERY_PAIRS)
        self.query_pairs = query_pairs
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend
        self.register_buffer("center_cls", torch.zeros(self.num_prototypes))
        self.register_buffer("center_query", torch.zeros(self.num_prototypes))

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, student_temperature="
            f"{self.student_temperature}, teacher_temperature="
            f"{self.warmup_teacher_temperature}->{self.teacher_temperature} over "
            f"{self.warmup_teacher_temperature_epochs} epochs, center_momentum="
            f"{self.center_momentum}, query_weight={self.query_weight}, "
            f"query_pairs={self.query_pairs!r}"
        )

    def teacher_temperature_at(self, epoch: float) -> float:
        """``tau_t`` at ``epoch``: DINO's linear warm-up, then constant."""
        _checks.real("epoch", epoch, 0)
        warmup = self.warmup_teacher_temperature_epochs
        if epoch >= warmup:
            return self.teacher_temperature
        if warmup == 1:
            return self.warmup_teacher_temperature
        start, end = self.warmup_teacher_temperature, self.teacher_temperature
        return start + (end - start) * min(epoch / (warmup - 1), 1.0)

    def forward(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_query: torch.Tensor | None,
        teacher_query: torch.Tensor | None,
        student_weight: torch.Tensor,
        teacher_weight: torch.Tensor | None = None,
        *,
        epoch: float,
    ) -> torch.Tensor:
        """The ADCLR loss (fp32 scalar; fp64 for fp64 inputs).

        Args:
            student_cls: ``[V, B, D]`` student head features (before the last layer) of the CLS
                token of each view; views 0 and 1 are the global views, any further ones local
                crops.
            teacher_cls: ``[2, B, D_t]`` teacher head features of the CLS token of the two
                global views, or ``[2, B, K]`` teacher logits when ``teacher_weight`` is None.
            student_query: ``[2, B, Q, D]`` student head features of the ``Q`` query tokens
                appended to each global view (None: no query term).
            teacher_query: ``[2, B, Q, D_t]`` (or ``[2, B, Q, K]`` logits) of the teacher.
            student_weight: ``[K, D]`` the student's last layer (prototypes); gets a gradient.
            teacher_weight: ``[K, D_t]`` the teacher's last layer, or None (logits given).
            epoch: the current (possibly fractional) epoch, for the temperature warm-up.
        """
        tau_t = self.teacher_temperature_at(epoch)
        self._check_inputs(
            student_cls, teacher_cls, student_query, teacher_query, student_weight, teacher_weight
        )
        views, batch = student_cls.shape[:2]
        pairs = [(a, b) for a in range(2) for b in range(views) if b != a]
        student_rows = torch.cat([student_cls[b] for _, b in pairs])
        teacher_rows = torch.cat([teacher_cls[a] for a, _ in pairs])
        inputs = {"cls": (student_rows, teacher_rows, 2 * batch, self.center_cls)}
        if student_query is not None:
            order = (1, 0) if self.query_pairs == "cross" else (0, 1)
            student_rows = torch.cat([student_query[b] for b in order]).flatten(0, -2)
            teacher_rows = teacher_query.flatten(0, -2)
            inputs["query"] = (student_rows, teacher_rows, len(teacher_rows), self.center_query)
        terms = {
            name: self._term(*rows_and_center, student_weight, teacher_weight, tau_t)
            for name, rows_and_center in inputs.items()
        }
        local = _statistics(terms)
        # the centres move by the mean over all ranks; the loss needs it only when gathering
        needs_reduce = self.gather_distributed or self.training
        total = distributed.all_reduce_sums(local) if needs_reduce else local
        # gathering, each rank returns world_size x its share of the mean over every rank's rows
        ranks, counts = (
            (distributed.world_size(), total) if self.gather_distributed else (1.0, local)
        )
        loss = terms["cls"].loss_sum * (ranks / counts["cls_student_rows"])
        if "query" in terms:
            scale = ranks / counts["query_student_rows"]
            loss = loss + self.query_weight * terms["query"].loss_sum * scale
        if self.training:
            self._update_centers(total)
        return loss

    def _term(
        self, student, teacher, teacher_rows, center, student_weight, teacher_weight, tau_t
    ) -> _Term:
        """``H`` of the ``student`` rows against the ``teacher`` rows, of which ``teacher_rows``
        are distinct."""
        loss_sum, teacher_mean = linear_soft_ce(
            student,
            student_weight,
            teacher,
            teacher_weight,
            student_temperature=self.student_temperature,
            teacher_temperature=tau_t,
            center=center,
            reduction="sum",
            backend=self.backend,
        )
        return _Term(loss_sum, teacher_mean * teacher_rows, len(student), teacher_rows)

    @torch.no_grad()
    def _update_centers(self, total: dict[str, torch.Tensor]) -> None:
        m = self.center_momentum
        for name, center in (("cls", self.center_cls), ("query", self.center_query)):
            if f"{name}_teacher_logits" in total:
                mean = total[f"{name}_teacher_logits"] / total[f"{name}_teacher_rows"]
                center.mul_(m).add_(mean.to(center.dtype), alpha=1 - m)

    def _check_inputs(
        self, student_cls, teacher_cls, student_query, teacher_query, student_weight, teacher_weight
    ) -> None:
        k = self.num_prototypes
        _checks.float_tensor(
            "student_weight", student_weight, ndim=2, kind=" ([K, D] student last layer)"
        )
        _checks.dim_size("student_weight", student_weight, 0, k, "num_prototypes")
        _checks.float_tensor("student_cls", student_cls, ndim=3, kind=" ([V, B, D])")
        if len(student_cls) < 2:
            raise ValueError(
                "student_cls must hold at least the two global views in dimension "
                f"0, got {_checks.describe(student_cls)}"
            )
        _checks.float_tensor("teacher_cls", teacher_cls, ndim=3, kind=" ([2, B, D_t or K])")
        batch = student_cls.shape[1]
        if tuple(teacher_cls.shape[:2]) != (2, batch):
            raise ValueError(
                f"teacher_cls must be [2, B={batch}, ...] (the two global views), "
                f"got {_checks.describe(teacher_cls)}"
            )
        if (student_query is None) != (teacher_query is None):
            raise ValueError("student_query and teacher_query must both be given or both None")
        if student_query is None:
            return
        _checks.float_tensor("student_query", student_query, ndim=4, kind=" ([2, B, Q, D])")
        _checks.float_tensor("teacher_query", teacher_query, ndim=4, kind=" ([2, B, Q, D_t or K])")
        if student_query.shape[:2] != (2, batch):
            raise ValueError(
                f"student_query must be [2, B={batch}, Q, D], got {_checks.describe(student_query)}"
            )
        if teacher_query.shape[:3] != student_query.shape[:3]:
            raise ValueError(
                f"teacher_query must be [2, B, Q] = {list(student_query.shape[:3])}"
                f" x features like student_query, got "
                f"{_checks.describe(teacher_query)}"
            )
        if (
            student_query.shape[-1] != student_cls.shape[-1]
            or teacher_query.shape[-1] != teacher_cls.shape[-1]
        ):
            raise ValueError(
                "student_query/teacher_query must have the feature width of "
                f"student_cls/teacher_cls, got {_checks.describe(student_query)} "
                f"and {_checks.describe(teacher_query)}"
            )


def query_attention_mask(
    n_global: int, n_query: int, dtype: torch.dtype = torch.bool, device=None
) -> torch.Tensor:
    """``[L, L]`` attention mask (``L = n_global + n_query``) for a ViT whose input is
    ``[global tokens (CLS + patches) | query tokens]``: global tokens attend only to global
    tokens (so their outputs are exactly those of the plain ViT), query tokens attend to every
    token (the global ones, each other and themselves).

    ``dtype=torch.bool`` (default): ``True`` = may attend, the convention of
    ``torch.nn.functional.scaled_dot_product_attention`` (and timm's ``Attention`` on its fused
    path, which passes the mask to it). A floating ``dtype`` gives the additive form: 0 where
    allowed, ``-inf`` where not (for attention code that adds the mask to the scores). The mask
    broadcasts over batch and heads (``[L, L]`` against ``[B, H, L, L]``).
    """
    n_global = _checks.integer("n_global", n_global, 1)  # at least the CLS token
    n_query = _checks.integer("n_query", n_query, 0)
    if dtype != torch.bool and not dtype.is_floating_point:
        raise TypeError(f"dtype must be torch.bool or a floating dtype, got {dtype}")
    length = n_global + n_query
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    allowed[:n_global, n_global:] = False
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, float("-inf"))


def _statistics(terms: dict[str, _Term]) -> dict[str, torch.Tensor]:
    """What the loss scale and the centres need from each term, by name: ``<term>_teacher_logits``
    ``[K]``, ``<term>_student_rows`` and ``<term>_teacher_rows``, in the loss's accumulation dtype
    (the counts copied to the device at once)."""
    loss_sum = terms["cls"].loss_sum
    sums = {
        f"{name}_teacher_logits": t.teacher_logits.to(loss_sum.dtype) for name, t in terms.items()
    }
    counts = {}
    for name, term in terms.items():
        counts[f"{name}_student_rows"] = term.student_rows
        counts[f"{name}_teacher_rows"] = term.teacher_rows
    values = torch.tensor(list(counts.values()), dtype=loss_sum.dtype, device=loss_sum.device)
    return sums | dict(zip(counts, values))
