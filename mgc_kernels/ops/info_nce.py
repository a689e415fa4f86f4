"""``info_nce``: InfoNCE with hard or sparse soft targets, row weights and a queue of negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks, backends
from .._dtypes import accumulate
from ..options import REDUCTIONS
from ..reference import info_nce as reference

backends.register("info_nce", "torch")(reference.info_nce)
backends.register("info_nce_backward", "torch")(reference.info_nce_backward)
backends.register_lazy("info_nce", "triton", "mgc_kernels.triton.info_nce:info_nce")
backends.register_lazy(
    "info_nce_backward", "triton", "mgc_kernels.triton.info_nce:info_nce_backward"
)


@torch.library.custom_op("mgc_kernels::info_nce", mutates_args=())
def _info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None,
    target_index: torch.Tensor,
    target_weight: torch.Tensor,
    temperature: float,
    need_v: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.call(
        "info_nce", backend, q, k, queue, target_index, target_weight, temperature, need_v
    )


@_info_nce.register_fake
def _(q, k, queue, target_index, target_weight, temperature, need_v, backend):
    acc = accumulate(q.dtype)
    return (
        q.new_empty(q.shape[0], dtype=acc),
        q.new_empty(q.shape[0], dtype=acc),
        q.new_empty(q.shape[0] if need_v else 0, q.shape[1], dtype=acc),
    )


@torch.library.custom_op("mgc_kernels::info_nce_backward", mutates_args=())
def _info_nce_backward(
    grad_row_loss: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None,
    target_index: torch.Tensor,
    target_weight: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    grad_lse: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return backends.call(
        "info_nce_backward",
        backend,
        grad_row_loss,
        q,
        k,
        queue,
        target_index,
        target_weight,
        lse,
        temperature,
        grad_lse,
    )


@_info_nce_backward.register_fake
def _(grad_row_loss, q, k, queue, target_index, target_weight, lse, temperature, grad_lse, backend):
    return torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, queue, target_index, target_weight, ctx.temperature, _, ctx.backend = inputs
    ctx.save_for_backward(q, k, queue, target_index, target_weight, output[1], output[2])
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_row_loss, grad_lse, grad_v):
    q, k, queue, target_index, target_weight, lse, v = ctx.saved_tensors
    if grad_row_loss is None:
        grad_row_loss = torch.zeros_like(lse)
    dq = dk = None
    if ctx.needs_input_grad[0]:
        dq = query_grad(
            v, grad_row_loss, grad_lse, target_index, target_weight, k, ctx.temperature
        ).to(q.dtype)
    if ctx.needs_input_grad[1]:
        dk = _info_nce_backward(
            grad_row_loss.contiguous(),
            q,
            k,
            queue,
            target_index,
            target_weight,
            lse,
            ctx.temperature,
            None if grad_lse is None else grad_lse.contiguous(),
            ctx.backend,
        )
    return dq, dk, None, None, None, None, None, None


_info_nce.register_autograd(_backward, setup_context=_setup_context)


def query_grad(
    v, grad_row_loss, grad_lse, target_index, target_weight, k, temperature: float
) -> torch.Tensor:
    """``dq`` from the forward's ``v_i = a_i O_i - T_i`` (``O = softmax @ [k; queue]``,
    ``T_i = sum_p t_ip k[index_ip]``, ``a_i = sum(t_i)``, or ``v_i = O_i`` where ``a_i = 0``):
    ``tau dq_i = (g_i a_i + c_i) O_i - g_i T_i``, which is ``g_i v_i`` without an LSE gradient
    ``c`` and needs ``T`` (a gather) only with one."""
    g = grad_row_loss.to(v.dtype)
    mass = target_weight.to(v.dtype).sum(1)
    if grad_lse is None:
        return torch.where(mass > 0, g, 0.0)[:, None] * v / temperature
    picked = (target_weight.to(v.dtype)[..., None] * k.to(v.dtype)[target_index]).sum(1)
    coef = g * mass + grad_lse.to(v.dtype)
    attention = (v + picked) / torch.where(mass > 0, mass, 1.0)[:, None]
    return (coef[:, None] * attention - g[:, None] * picked) / temperature


def needs_grad(q: torch.Tensor) -> bool:
    """Whether the forward must save what ``dq`` needs (autograd will ask for it)."""
    return torch.is_grad_enabled() and q.requires_grad


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit rows, computed in the accumulation dtype (an fp16 norm overflows at |x| ~ 256)."""
    return F.normalize(x.to(accumulate(x.dtype)), dim=-1).to(x.dtype)


def reduce_rows(
    row_loss: torch.Tensor, row_weights: torch.Tensor | None, has_target, reduction: str
) -> torch.Tensor:
    """``mean`` = sum(w * CE) / sum(w) over rows with a target; ``sum``; ``none`` = w * CE."""
    weights = has_target.to(row_loss.dtype)
    if row_weights is not None:
        weights = weights * row_weights.to(row_loss.dtype)
    weighted = weights * row_loss
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def check_row_weights(row_weights, n: int, device) -> None:
    if row_weights is None:
        return
    _checks.float_tensor("row_weights", row_weights, ndim=1, kind=" ([N] row weights)")
    _checks.dim_size("row_weights", row_weights, 0, n, "one weight per row of q")
    _checks.on_device("row_weights", row_weights, device)
    _checks.nonnegative_finite("row_weights", row_weights)


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    targets,
    temperature: float = 0.1,
    row_weights: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
    normalize: bool = True,
    *,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """InfoNCE of queries ``q`` against keys ``k`` (and a ``queue`` of extra negatives).

    Row ``i``'s logits are ``q_i . [k; queue]^T / temperature`` (after L2 normalisation when
    ``normalize``); its loss ``CE_i`` is the cross-entropy against its target: a key index
    (``targets`` a LongTensor ``[N]``) or a sparse distribution over keys (``targets`` a tuple
    ``(index [N, P], weight [N, P])``, weights normalised per row; a row whose weights sum to 0
    has no target and is left out). ``targets="paired"`` is MoCo's form: ``k`` holds one positive
    per row (``[N, D]``), the other rows of ``k`` are not negatives, and the negatives are the
    queue's (``logits_i = [q_i . k_i, q_i . queue^T] / temperature``, target 0). The queue only
    supplies negatives and gets no gradient.

    Returns (fp32) ``sum_i w_i CE_i / sum_i w_i`` for ``reduction="mean"`` (``w`` = ``row_weights``,
    default 1), the sum for ``"sum"``, and the ``[N]`` values ``w_i CE_i`` for ``"none"``.
    """
    _checks.embeddings(q, k)
    temperature = _checks.positive("temperature", temperature)
    _checks.choice("reduction", reduction, REDUCTIONS)
    if queue is not None:
        _checks.float_tensor("queue", queue, ndim=2, kind=" ([Q, D] negative keys)")
        _checks.dim_size("queue", queue, 1, q.shape[1], "the feature width D of q")
        _checks.same_dtype("queue", queue, "q", q)
        _checks.same_device(q=q, queue=queue)
        queue = queue.detach()
    paired = isinstance(targets, str) and targets == "paired"
    if paired:
        check_paired(k, queue, len(q))
    else:
        index, weight = _checks.targets(targets, len(q), len(k), q.device, accumulate(q.dtype))
        index, weight, stray_rows = drop_stray_targets(index, weight, len(k))
    check_row_weights(row_weights, len(q), q.device)
    if normalize:
        q, k = l2_normalize(q), l2_normalize(k)
        queue = None if queue is None else l2_normalize(queue)
    backend = backends.resolve("info_nce", backend, q.device, q.dtype)
    if paired:
        row_loss = paired_rows(q.contiguous(), k, queue.contiguous(), temperature, backend)
        return reduce_rows(row_loss, row_weights, torch.ones_like(row_loss), reduction)
    row_loss, _, _ = _info_nce(
        q.contiguous(),
        k.contiguous(),
        None if queue is None else queue.contiguous(),
        index,
        weight,
        temperature,
        needs_grad(q),
        backend,
    )
    row_loss = torch.where(stray_rows, torch.nan, row_loss)
    return reduce_rows(row_loss, row_weights, weight.sum(1) > 0, reduction)


def drop_stray_targets(index: torch.Tensor, weight: torch.Tensor, m: int):
    """``(index, weight, stray_rows)`` with every target outside ``[0, m)`` made padding
    ``(0, 0)``. Such targets pass only where the host-side range check does not run (value checks
    off, or under torch.compile); no backend then reads or writes outside ``k`` (an index into the
    queue would silently pick a negative in the reference, and an out-of-bounds one would crash a
    CUDA context), and the rows that had one get a NaN loss instead of a silently wrong one."""
    stray = (index < 0) | (index >= m)
    stray_rows = (stray & (weight != 0)).any(1)
    return torch.where(stray, 0, index), torch.where(stray, 0.0, weight), stray_rows


def check_paired(k: torch.Tensor, queue: torch.Tensor | None, n: int) -> None:
    _checks.dim_size("k", k, 0, n, "one positive key per row of q for targets='paired'")
    if queue is None:
        raise ValueError("targets='paired' takes its negatives from the queue, but queue is None")


def paired_rows(q, k, queue, temperature: float, backend: str) -> torch.Tensor:
    """MoCo rows: ``logaddexp(l_pos, lse over the queue) - l_pos``; the fused op supplies the
    queue's log-sum-exp (and its gradient, the softmax) without storing the N x Q logits."""
    acc = accumulate(q.dtype)
    positive = (q.to(acc) * k.to(acc)).sum(-1) / temperature
    no_target = torch.zeros(len(q), 0, device=q.device, dtype=torch.long)
    _, lse_negatives, _ = _info_nce(
        q, queue, None, no_target, no_target.to(acc), temperature, needs_grad(q), backend
    )
    return torch.logaddexp(positive, lse_negatives) - positive
