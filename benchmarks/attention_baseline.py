"""The ``torch_attention`` baseline: the library's dense InfoNCE losses, loss and gradients,
assembled from PyTorch's own fused attention kernels, as a user without this library could.

With ``s = q k^T / tau`` (L2-normalised rows), ``p`` the softmax of ``s`` over the keys and
soft targets ``t_ij`` (each row sums to 1, or to 0 for a row without a target, ``a_i = sum_j
t_ij``), row ``i``'s loss is ``a_i lse_i - sum_j t_ij s_ij``. Everything that touches all ``N x M``
logits is an attention call, so the logits are never stored:

- forward: attention with ``V = K`` gives ``O = p @ k`` and ``lse`` in one pass;
- ``dq_i = g_i (a_i O_i - sum_j t_ij k_j) / tau`` (``g`` the upstream gradient of the rows);
- ``dk_j = (sum_i g_i a_i p_ij q_i - sum_i g_i t_ij q_i) / tau``. The first sum is a second
  attention from the keys to the queries whose scores are ``s_ij - lse_i``: the per-query bias
  rides in extra feature columns (queries ``[k_j, 1, 1]``, keys ``[q_i, hi_i, lo_i]`` with
  ``hi + lo = -lse_i * tau``, zero-padded to a multiple of 8), values ``g_i a_i q_i``; the kernel
  normalises its output by its own softmax sum, so the sum wanted is ``output * exp(its lse)``.

The targets are block diagonal (each image's queries only target that image's keys), so every
target term is a batched matmul over ``[B, R_q, R_k]`` blocks: MGC's overlap weights for
``geometric_info_nce``, and ``1 x 1`` blocks of 1 (each query's own key) for InfoNCE with a
queue, whose queue rows are extra keys of the first attention only (they get no gradient).

Which fused kernel runs: on CPU the flash kernel for CPU (the only fused CPU kernel that returns
the log-sum-exp); on CUDA the one that ``scaled_dot_product_attention`` would pick for the
inputs, then flash, cuDNN and memory-efficient attention. Each is tried once per device, dtype
and width on a small problem and kept only if it runs and returns the natural-log LSE it should,
so a kernel this torch build lacks, or one that refuses a dtype or width, is passed over and,
when none works, the provider skips with the reasons.
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

ALIGN = 8  # fused kernels want head widths in multiples of 8


def _cpu_flash(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


def _flash(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]


def _cudnn(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]


def _efficient(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[
        :2
    ]


CANDIDATES = {
    "cpu": {SDPBackend.FLASH_ATTENTION: _cpu_flash},
    "cuda": {
        SDPBackend.FLASH_ATTENTION: _flash,
        SDPBackend.CUDNN_ATTENTION: _cudnn,
        SDPBackend.EFFICIENT_ATTENTION: _efficient,
    },
}


def _call(kernel, q, k, v, scale):
    """``(out [L, E], lse [L])`` of one head given as 2-D tensors; the LSE's layout differs per
    kernel (``[1, 1, L]``, ``[1, 1, L, 1]``, or padded to a multiple of 32), hence the slice."""
    out, lse = kernel(*(x[None, None] for x in (q, k, v)), scale)
    return out[0, 0], lse.flatten(2)[0, 0, : len(q)]


def _order(device: torch.device, dtype: torch.dtype, width: int) -> list:
    """The kernels for ``device``, the one ``scaled_dot_product_attention`` picks first."""
    kernels = CANDIDATES.get(device.type, {})
    try:
        x = torch.zeros(1, 1, ALIGN, width, device=device, dtype=dtype)
        first = SDPBackend(torch._fused_sdp_choice(x, x, x))
    except Exception:  # a private helper: without it, keep the default order
        first = None
    return sorted(kernels.items(), key=lambda item: item[0] != first)


@cache
def pick(device: torch.device, dtype: torch.dtype, width: int):
    """The first kernel that runs at ``(device, dtype, width)`` and returns the natural-log LSE
    and the attention output, or a string saying why none does."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, width, generator=gen, dtype=torch.float64) for n in (40, 72, 72))
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # what the kernel sees
    scores = 10.0 * q @ k.T  # as sharp as a temperature of 0.1 makes them
    want_lse, want_out = scores.logsumexp(1), scores.softmax(1) @ v
    # loose enough for TF32 and 16-bit outputs, far tighter than a base-2 LSE (~6 off here)
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-2}.get(dtype, 5e-2)
    reasons = []
    for backend, kernel in _order(device, dtype, width):
        try:
            args = (x.to(device, dtype) for x in (q, k, v))
            out, lse = (x.double().cpu() for x in _call(kernel, *args, 10.0))
        except Exception as err:  # this kernel does not take these inputs here
            reasons.append(f"{backend.name}: {(str(err).splitlines() or [''])[0][:120]}")
            continue
        if (lse - want_lse).abs().max() < tolerance and (
            out - want_out
        ).abs().max() < 2 * tolerance:
            return kernel
        reasons.append(f"{backend.name}: wrong output or LSE units")
    return (
        f"no fused attention kernel returning the log-sum-exp for {device.type} "
        f"{dtype} width {width}: {'; '.join(reasons) or 'none exists'}"
    )


def unavailable(device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    """None when both attention calls (width ``dim`` and ``dim + 2``, padded) have a kernel."""
    for width in (_padded(dim), _padded(dim + 2)):
        kernel = pick(torch.device(device), dtype, width)
        if isinstance(kernel, str):
            return kernel
    return None


def _padded(width: int) -> int:
    return -(-width // ALIGN) * ALIGN


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]))


def attention(q, k, v, scale: float):
    """``(softmax(scale q k^T) v, logsumexp(scale q k^T))`` of 2-D ``q [L, E]``, ``k, v [S, E]``
    with a fused kernel; ``E`` is zero-padded to a multiple of 8 (zeros change no dot product)."""
    width = _padded(q.shape[1])
    kernel = pick(q.device, q.dtype, width)
    if isinstance(kernel, str):
        raise RuntimeError(kernel)
    out, lse = _call(kernel, *(_pad(x, width).contiguous() for x in (q, k, v)), scale)
    return out[:, : v.shape[1]], lse


class BlockInfoNCE(torch.autograd.Function):
    """Row losses ``[N]`` (accumulation dtype) of queries ``q [B * R_q, D]`` against keys
    ``k [B * R_k, D]`` and an optional ``queue [Q, D]`` of extra negative keys, with
    block-diagonal soft targets ``targets [B, R_q, R_k]`` (rows summing to 1 or 0)."""

    @staticmethod
    def forward(ctx, q, k, queue, targets, temperature: float):
        acc = targets.dtype
        keys = k if queue is None else torch.cat([k, queue])
        out, lse = attention(q, keys, keys, 1.0 / temperature)
        has_target = targets.sum(-1).flatten() > 0
        # sum_j t_ij k_j, per image: the target's share of dq and of the loss
        target_keys = (targets @ k.to(acc).view(len(targets), -1, k.shape[1])).flatten(0, 1)
        lse = lse.to(acc)
        row_loss = has_target * lse - (q.to(acc) * target_keys).sum(1) / temperature
        ctx.save_for_backward(q, k, targets, out, lse, target_keys, has_target)
        ctx.temperature = temperature
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        q, k, targets, out, lse, target_keys, has_target = ctx.saved_tensors
        tau, acc = ctx.temperature, targets.dtype
        g = grad_rows.to(acc)
        g_softmax = g * has_target
        dq = (g_softmax[:, None] * out.to(acc) - g[:, None] * target_keys) / tau
        dk = None
        if ctx.needs_input_grad[1]:
            # second attention, keys -> queries, scores s_ij - lse_i: its unnormalised output is
            # sum_i p_ij g_i a_i q_i. The bias is split into two columns (hi + lo): one bf16
            # column rounds it by up to ~4e-3 / tau, a few % of p_ij, which made dk's error in
            # bf16 ~3x that of the rest of the computation.
            bias = -lse * tau
            hi = bias.to(q.dtype)
            lo = (bias - hi.to(acc)).to(q.dtype)
            ones = torch.ones(len(k), 2, device=k.device, dtype=k.dtype)
            values = (g_softmax[:, None] * q.to(acc)).to(q.dtype)
            dense, lse_dense = attention(
                torch.cat([k, ones], 1),
                torch.cat([q, hi[:, None], lo[:, None]], 1),
                _pad(values, q.shape[1] + 2),
                1.0 / tau,
            )
            dense = dense[:, : q.shape[1]].to(acc) * lse_dense.to(acc).exp()[:, None]
            # sum_i g_i t_ij q_i, per image
            weighted = (targets * g.view(targets.shape[:2])[..., None]).transpose(1, 2)
            target_part = weighted @ q.to(acc).view(len(targets), -1, q.shape[1])
            dk = ((dense - target_part.flatten(0, 1)) / tau).to(k.dtype)
        return dq.to(q.dtype), dk, None, None, None


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit rows computed in fp32 at least, as the library's ops normalise."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.normalize(x.to(acc), dim=-1).to(x.dtype)


def mgc_blocks(q_regions: torch.Tensor, k_regions: torch.Tensor) -> torch.Tensor:
    """``[B, R_q, R_k]`` MGC overlap weights ``|a & b| / (|a| + |b|)`` between the region boxes
    ``[B, R_q, 4]`` and ``[B, R_k, 4]`` (x0, y0, x1, y1) of each image's two views."""
    acc = torch.promote_types(q_regions.dtype, torch.float32)
    ax0, ay0, ax1, ay1 = q_regions.to(acc)[:, :, None].unbind(-1)
    bx0, by0, bx1, by1 = k_regions.to(acc)[:, None].unbind(-1)
    width = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp_min(0)
    height = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp_min(0)
    return width * height / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0))


def geometric_info_nce(q, k, q_regions, k_regions, temperature: float) -> torch.Tensor:
    """``mk.geometric_info_nce(..., metric="mgc")`` (mean reduction) for rows grouped by image:
    ``q [B * R_q, D]``, ``k [B * R_k, D]``, region boxes ``[B, R_q, 4]`` and ``[B, R_k, 4]``."""
    acc = torch.promote_types(q.dtype, torch.float32)
    weights = mgc_blocks(q_regions, k_regions).to(acc)
    rho = weights.sum(-1, keepdim=True)
    targets = weights / rho.clamp_min(torch.finfo(acc).tiny)
    row_loss = BlockInfoNCE.apply(_normalize(q), _normalize(k), None, targets, temperature)
    rho = rho.flatten()
    return (rho * row_loss).sum() / rho.sum().clamp_min(torch.finfo(acc).tiny)


def info_nce_queue(q, k, queue, temperature: float) -> torch.Tensor:
    """``mk.info_nce(q, k, arange(N), temperature, queue=queue)``: row ``i``'s positive is
    ``k_i``, its negatives the other rows of ``k`` and the queue (which gets no gradient)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    own_key = torch.ones(len(q), 1, 1, device=q.device, dtype=acc)
    return BlockInfoNCE.apply(
        _normalize(q), _normalize(k), _normalize(queue.detach()), own_key, temperature
    ).mean()


def geometric_step(q, k, q_regions, k_regions, batch: int, temperature: float):
    """The benchmark step of the ``geometric_info_nce`` case (region boxes ``[B * R, 4]``, rows
    contiguous per image), or why it cannot run here. The weights are computed every step, as
    the library op computes its targets."""
    reason = unavailable(q.device, q.dtype, q.shape[1])
    if reason:
        return reason
    q_boxes, k_boxes = q_regions.view(batch, -1, 4), k_regions.view(batch, -1, 4)
    return partial(geometric_info_nce, q, k, q_boxes, k_boxes, temperature)


def queue_step(q, k, queue, temperature: float):
    """The benchmark step of the ``info_nce_queue`` case, or why it cannot run here."""
    return unavailable(q.device, q.dtype, q.shape[1]) or partial(
        info_nce_queue, q, k, queue, temperature
    )
