"""``geometric_info_nce``: dense InfoNCE whose soft targets are made from region boxes."""

from __future__ import annotations

import torch

from .. import _checks, backends
from .._dtypes import accumulate
from ..options import METRICS, REDUCTIONS
from ..reference import geometric_info_nce as reference
from .info_nce import l2_normalize, needs_grad, reduce_rows

backends.register("geometric_info_nce", "torch")(reference.geometric_info_nce)
backends.register("geometric_info_nce_backward", "torch")(reference.geometric_info_nce_backward)
backends.register_lazy(
    "geometric_info_nce", "triton", "mgc_kernels.triton.geometric_info_nce:geometric_info_nce"
)
backends.register_lazy(
    "geometric_info_nce_backward",
    "triton",
    "mgc_kernels.triton.geometric_info_nce:geometric_info_nce_backward",
)


@torch.library.custom_op("mgc_kernels::geometric_info_nce", mutates_args=())
def _geometric_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    q_regions: torch.Tensor,
    k_regions: torch.Tensor,
    q_image: torch.Tensor,
    k_image: torch.Tensor,
    temperature: float,
    metric: str,
    need_v: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.call(
        "geometric_info_nce",
        backend,
        q,
        k,
        q_regions,
        k_regions,
        q_image,
        k_image,
        temperature,
        metric,
        need_v,
    )


@_geometric_info_nce.register_fake
def _(q, k, q_regions, k_regions, q_image, k_image, temperature, metric, need_v, backend):
    acc = accumulate(q.dtype)
    rows = tuple(q.new_empty(q.shape[0], dtype=acc) for _ in range(3))
    return rows + (q.new_empty(q.shape[0] if need_v else 0, q.shape[1], dtype=acc),)


@torch.library.custom_op("mgc_kernels::geometric_info_nce_backward", mutates_args=())
def _geometric_info_nce_backward(
    grad_row_loss: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_regions: torch.Tensor,
    k_regions: torch.Tensor,
    q_image: torch.Tensor,
    k_image: torch.Tensor,
    lse: torch.Tensor,
    rho: torch.Tensor,
    temperature: float,
    metric: str,
    backend: str,
) -> torch.Tensor:
    return backends.call(
        "geometric_info_nce_backward",
        backend,
        grad_row_loss,
        q,
        k,
        q_regions,
        k_regions,
        q_image,
        k_image,
        lse,
        rho,
        temperature,
        metric,
    )


@_geometric_info_nce_backward.register_fake
def _(
    grad_row_loss,
    q,
    k,
    q_regions,
    k_regions,
    q_image,
    k_image,
    lse,
    rho,
    temperature,
    metric,
    backend,
):
    return torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    (q, k, q_regions, k_regions, q_image, k_image, ctx.temperature, ctx.metric, _, ctx.backend) = (
        inputs
    )
    ctx.save_for_backward(q, k, q_regions, k_regions, q_image, k_image, *output[1:])
    ctx.mark_non_differentiable(*output[1:])  # the backward uses only the row losses' gradient


def _backward(ctx, grad_row_loss, grad_lse, grad_rho, grad_v):
    q, k, q_regions, k_regions, q_image, k_image, lse, rho, v = ctx.saved_tensors
    dq = dk = None
    if ctx.needs_input_grad[0]:  # v is 0 on rows without overlap
        dq = (grad_row_loss.to(v.dtype)[:, None] * v / ctx.temperature).to(q.dtype)
    if ctx.needs_input_grad[1]:
        dk = _geometric_info_nce_backward(
            grad_row_loss.contiguous(),
            q,
            k,
            q_regions,
            k_regions,
            q_image,
            k_image,
            lse,
            rho,
            ctx.temperature,
            ctx.metric,
            ctx.backend,
        )
    return dq, dk, None, None, None, None, None, None, None, None


_geometric_info_nce.register_autograd(_backward, setup_context=_setup_context)


def check_regions(name: str, regions, rows: int, device) -> None:
    _checks.float_tensor(name, regions, ndim=2, kind=" ([rows, 4] region boxes x0, y0, x1, y1)")
    _checks.dim_size(name, regions, 1, 4, "x0, y0, x1, y1")
    _checks.dim_size(name, regions, 0, rows, "one box per embedding row")
    _checks.on_device(name, regions, device)
    _checks.boxes_values(name, regions)


def check_image_ids(name: str, image, rows: int, device) -> None:
    _checks.tensor(
        name, image, ndim=1, dtypes=(torch.int64, torch.int32), kind=" ([rows] image ids)"
    )
    _checks.dim_size(name, image, 0, rows, "one image id per embedding row")
    _checks.on_device(name, image, device)


def geometric_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    q_regions: torch.Tensor,
    k_regions: torch.Tensor,
    q_image: torch.Tensor,
    k_image: torch.Tensor,
    temperature: float = 0.1,
    metric: str = "mgc",
    normalize: bool = True,
    *,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Dense-mode InfoNCE: every query row against every key, targets made from geometry.

    ``w_ij = metric(q_regions[i], k_regions[j])`` if ``q_image[i] == k_image[j]`` else 0,
    ``rho_i = sum_j w_ij``, target ``t_i = w_i / rho_i``; the loss is
    ``sum_i rho_i CE(logits_i, t_i) / sum_i rho_i`` (rows with ``rho_i = 0`` are left out), with
    ``logits = l2n(q) @ l2n(k).T / temperature``. ``reduction="sum"`` gives the numerator,
    ``"none"`` the ``[N]`` values ``rho_i CE_i``. Region boxes are (x0, y0, x1, y1) in source
    pixels, comparable only within one image.
    """
    _checks.embeddings(q, k)
    temperature = _checks.positive("temperature", temperature)
    _checks.choice("metric", metric, METRICS)
    _checks.choice("reduction", reduction, REDUCTIONS)
    check_regions("q_regions", q_regions, len(q), q.device)
    check_regions("k_regions", k_regions, len(k), q.device)
    check_image_ids("q_image", q_image, len(q), q.device)
    check_image_ids("k_image", k_image, len(k), q.device)
    if normalize:
        q, k = l2_normalize(q), l2_normalize(k)
    backend = backends.resolve("geometric_info_nce", backend, q.device, q.dtype)
    row_loss, _, rho, _ = _geometric_info_nce(
        q.contiguous(),
        k.contiguous(),
        q_regions.contiguous(),
        k_regions.contiguous(),
        q_image.contiguous(),
        k_image.contiguous(),
        temperature,
        metric,
        needs_grad(q),
        backend,
    )
    return reduce_rows(row_loss, rho, rho > 0, reduction)
