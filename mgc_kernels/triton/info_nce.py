"""Fused flash-style InfoNCE: the logits live only as register tiles, never in memory.

One kernel family serves ``info_nce`` and ``geometric_info_nce`` (constexpr ``GEOMETRIC``):

* ``_forward_kernel``: a program per ``BLOCK_R`` query rows loops over tiles of ``k`` and then of
  the queue (never concatenated), keeping an online max / sum-exp in fp32; it stores only
  ``lse [N]`` and ``row_loss [N]`` (and ``rho [N]`` when geometric). The sparse targets of
  ``info_nce`` are gathered by index; geometric targets ``w_ij`` are made from region boxes in
  registers, per tile.
* ``_dq_kernel``: per query block, recomputes each tile's softmax from the saved lse, forms
  ``ds = a_i * p_ij - t_ij`` in fp32 and accumulates ``ds @ keys``. The targets ``t_ij`` enter
  the tile before its rounding to the input dtype: sparse targets spread over the tile's
  columns (P compares a tile), geometric ones ``b_i * w_ij`` made from the boxes. Subtracted
  after the dot, a target whose softmax is near 1 would cancel against the rounded tile and
  leave ``u * |k| / tau`` of error (9 % of the gradient in fp16 on confident rows).
* ``_dk_kernel``: per block of ``k`` rows (the queue gets no gradient), loops over query blocks
  and accumulates ``ds^T @ q`` from the same tiles (no atomics: deterministic).

Logits stay in natural units (``exp``/``log``, not flash-attention's base 2): the saved lse then
cancels exactly against the identically rounded logits that the backward recomputes (a saturated
row gets p = 1, not 1 - ulp(lse) from converting the lse between bases). fp32 inputs use
full-precision dots (``input_precision="ieee"``; tf32 would not meet the tolerance rule);
fp16/bf16 tiles feed the tensor cores with fp32 accumulation. Row offsets are int64 (``rows * D``
passes 2**31 for a large queue). Tiles are fixed per feature width (the interpreter cannot
autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .region_boxes import box_metric

# the largest tiles at D <= 128: a program's own rows, and the rows of the tiles it loops over
MAX_ROWS, MAX_COLS = 128, 64


# --------------------------------------------------------------------------- device helpers


@triton.jit
def load_rows(X, idx, mask, D, offs_d):
    """``[len(idx), BLOCK_D]`` rows ``idx`` of the row-major ``[*, D]`` matrix ``X`` (0 where
    masked or past ``D``)."""
    ptrs = X + idx.to(tl.int64)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=mask[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _load_boxes(BOX, IMG, idx, mask):
    """``(x0, y0, x1, y1, image)`` of rows ``idx`` of fp32 boxes ``[*, 4]`` and image ids.
    Masked rows get the unit box, so that no lane divides 0 by 0 (the ops check that real
    boxes have positive areas)."""
    box = BOX + idx.to(tl.int64) * 4
    return (tl.load(box, mask=mask, other=0.0), tl.load(box + 1, mask=mask, other=0.0),
            tl.load(box + 2, mask=mask, other=1.0), tl.load(box + 3, mask=mask, other=1.0),
            tl.load(IMG + idx, mask=mask, other=0))


@triton.jit
def _tile_weights(qx0, qy0, qx1, qy1, kx0, ky0, kx1, ky1, same, METRIC: tl.constexpr):
    """Targets ``w`` of a tile: ``metric(query box, key box)`` where ``same`` (same image, both
    valid), else 0. The boxes broadcast to ``same``'s shape (queries on either axis)."""
    w = tl.zeros(same.shape, tl.float32)
    if tl.max(same.to(tl.int32)) > 0:  # most tiles of a large batch pair different images
        w = tl.where(same, box_metric(qx0, qy0, qx1, qy1, kx0, ky0, kx1, ky1, METRIC), 0.0)
    return w


@triton.jit
def _target_tile(TI, TW, rows, rmask, keys, P, M, KEYS_FIRST: tl.constexpr):
    """``t[i, j] = sum_p weight_ip * [index_ip == keys_j]``: the sparse targets of query
    ``rows`` spread over a logit tile, ``[rows, keys]`` (``[keys, rows]`` with ``KEYS_FIRST``)."""
    if KEYS_FIRST:
        t = tl.zeros([keys.shape[0], rows.shape[0]], tl.float32)
    else:
        t = tl.zeros([rows.shape[0], keys.shape[0]], tl.float32)
    for p in range(P):
        idx, w, valid = _target(TI, TW, rows, rmask, p, P, M)
        if KEYS_FIRST:
            t += tl.where(valid[None, :] & (idx[None, :] == keys[:, None]), w[None, :], 0.0)
        else:
            t += tl.where(valid[:, None] & (idx[:, None] == keys[None, :]), w[:, None], 0.0)
    return t


@triton.jit
def _online_lse(s, valid, m_i, l_i):
    """One tile's step of the running (max, sum exp) of logits ``s`` per row."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
    return m_new, l_i


@triton.jit
def _target(TI, TW, rows, rmask, p, P, M):
    """Key index and weight of target ``p`` of each row. Padding (weight 0) and indices outside
    ``[0, M)`` are masked out with weight 0: whatever the index tensor holds (value checks off,
    or skipped under torch.compile), no lane reads or writes outside ``k`` (the op turns such a
    row's loss into NaN)."""
    offs = rows.to(tl.int64) * P + p
    t = tl.load(TW + offs, mask=rmask, other=0.0)
    idx = tl.load(TI + offs, mask=rmask & (t != 0), other=0)
    valid = rmask & (t != 0) & (idx >= 0) & (idx < M)
    return idx, tl.where(valid, t, 0.0), valid


# --------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(Q, K, U, TI, TW, QBOX, QIMG, KBOX, KIMG, LSE, LOSS, RHO,
                    N, M, NU, P, D, inv_tau,
                    GEOMETRIC: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, rows, rmask, D, offs_d)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    rho = tl.zeros([BLOCK_R], tl.float32)
    w_logit = tl.zeros([BLOCK_R], tl.float32)
    if GEOMETRIC:
        qx0, qy0, qx1, qy1, q_img = _load_boxes(QBOX, QIMG, rows, rmask)
    for start in range(0, M, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        cmask = cols < M
        kt = load_rows(K, cols, cmask, D, offs_d)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * inv_tau
        m_i, l_i = _online_lse(s, cmask, m_i, l_i)
        if GEOMETRIC:
            kx0, ky0, kx1, ky1, k_img = _load_boxes(KBOX, KIMG, cols, cmask)
            same = (q_img[:, None] == k_img[None, :]) & rmask[:, None] & cmask[None, :]
            w = _tile_weights(qx0[:, None], qy0[:, None], qx1[:, None], qy1[:, None],
                              kx0[None, :], ky0[None, :], kx1[None, :], ky1[None, :],
                              same, METRIC)
            rho += tl.sum(w, 1)
            w_logit += tl.sum(w * s, 1)
    for start in range(0, NU, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ut = load_rows(U, cols, cols < NU, D, offs_d)
        s = tl.dot(q, tl.trans(ut), input_precision=PRECISION) * inv_tau
        m_i, l_i = _online_lse(s, cols < NU, m_i, l_i)
    lse = m_i + tl.log(l_i)
    if GEOMETRIC:
        # rho_i * CE_i / rho_i: [rho > 0] * lse - sum_j w_ij * logit_ij / rho_i
        mean_logit = tl.math.div_rn(w_logit, tl.where(rho > 0, rho, 1.0))
        loss = tl.where(rho > 0, lse - mean_logit, 0.0)
        tl.store(RHO + rows, rho, mask=rmask)
    else:
        total = tl.zeros([BLOCK_R], tl.float32)
        picked = tl.zeros([BLOCK_R], tl.float32)
        q32 = q.to(tl.float32)
        for p in range(P):
            idx, t, tmask = _target(TI, TW, rows, rmask, p, P, M)
            k_row = load_rows(K, idx, tmask, D, offs_d).to(tl.float32)
            total += t
            picked += t * tl.sum(q32 * k_row, 1)
        loss = total * lse - picked * inv_tau
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(LOSS + rows, loss, mask=rmask)


@triton.jit
def _dq_kernel(Q, K, U, TI, TW, QBOX, QIMG, KBOX, KIMG, LSE, G, A, B, DQ,
               N, M, NU, P, D, inv_tau,
               GEOMETRIC: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, rows, rmask, D, offs_d)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    a = tl.load(A + rows, mask=rmask, other=0.0)  # softmax coefficient: s_i or [rho_i > 0]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    if GEOMETRIC:
        b = tl.load(B + rows, mask=rmask, other=0.0)  # 1 / rho_i, 0 without overlap
        qx0, qy0, qx1, qy1, q_img = _load_boxes(QBOX, QIMG, rows, rmask)
    # keys past M / NU are masked out of ds: their zero logits can exceed a row's lse by more
    # than exp's range (inf * 0 = NaN in the dot)
    for start in range(0, M, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        cmask = cols < M
        kt = load_rows(K, cols, cmask, D, offs_d)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * inv_tau
        ds = tl.exp(s - lse[:, None]) * a[:, None]
        if GEOMETRIC:
            kx0, ky0, kx1, ky1, k_img = _load_boxes(KBOX, KIMG, cols, cmask)
            same = (q_img[:, None] == k_img[None, :]) & rmask[:, None] & cmask[None, :]
            w = _tile_weights(qx0[:, None], qy0[:, None], qx1[:, None], qy1[:, None],
                              kx0[None, :], ky0[None, :], kx1[None, :], ky1[None, :],
                              same, METRIC)
            ds -= w * b[:, None]
        else:
            ds -= _target_tile(TI, TW, rows, rmask, cols, P, M, False)
        ds = tl.where(cmask[None, :], ds, 0.0)
        acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PRECISION)
    for start in range(0, NU, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ut = load_rows(U, cols, cols < NU, D, offs_d)
        s = tl.dot(q, tl.trans(ut), input_precision=PRECISION) * inv_tau
        ds = tl.where((cols < NU)[None, :], tl.exp(s - lse[:, None]) * a[:, None], 0.0)
        acc = tl.dot(ds.to(ut.dtype), ut, acc, input_precision=PRECISION)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    dq = acc * (g * inv_tau)[:, None]
    tl.store(DQ + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _dk_kernel(Q, K, TI, TW, QBOX, QIMG, KBOX, KIMG, LSE, G, A, B, DK,
               N, M, P, D, inv_tau,
               GEOMETRIC: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    keys = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kmask = keys < M
    offs_d = tl.arange(0, BLOCK_D)
    dmask = kmask[:, None] & (offs_d < D)[None, :]
    kt = load_rows(K, keys, kmask, D, offs_d)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    if GEOMETRIC:
        kx0, ky0, kx1, ky1, k_img = _load_boxes(KBOX, KIMG, keys, kmask)
    # queries past N load as 0 rows with a = g = 0: they add nothing
    for start in range(0, N, BLOCK_C):
        rows = start + tl.arange(0, BLOCK_C)
        rmask = rows < N
        q = load_rows(Q, rows, rmask, D, offs_d)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        a = tl.load(A + rows, mask=rmask, other=0.0)
        s = tl.dot(kt, tl.trans(q), input_precision=PRECISION) * inv_tau  # [keys, queries]
        ds = tl.exp(s - lse[None, :]) * a[None, :]
        if GEOMETRIC:
            qx0, qy0, qx1, qy1, q_img = _load_boxes(QBOX, QIMG, rows, rmask)
            b = tl.load(B + rows, mask=rmask, other=0.0)
            same = (k_img[:, None] == q_img[None, :]) & kmask[:, None] & rmask[None, :]
            w = _tile_weights(qx0[None, :], qy0[None, :], qx1[None, :], qy1[None, :],
                              kx0[:, None], ky0[:, None], kx1[:, None], ky1[:, None],
                              same, METRIC)
            ds -= w * b[None, :]
        else:
            ds -= _target_tile(TI, TW, rows, rmask, keys, P, M, True)
        # fold the row gradients in scaled to |g| <= 1 so that fp16 tiles cannot underflow
        g = tl.load(G + rows, mask=rmask, other=0.0)
        g_max = tl.max(tl.abs(g), 0)
        g_max = tl.where(g_max > 0, g_max, 1.0)
        ds = ds * (g * (1.0 / g_max))[None, :]
        acc += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION) * g_max
    tl.store(DK + keys.to(tl.int64)[:, None] * D + offs_d[None, :],
             (acc * inv_tau).to(DK.dtype.element_ty), mask=dmask)


# --------------------------------------------------------------------------- launchers


def config(rows: int, cols: int, d: int, dtype: torch.dtype) -> dict:
    """Fixed tiles for a program owning ``rows`` rows and looping over ``cols``: at most
    ``MAX_ROWS x MAX_COLS`` at D <= 128, shrunk for wider rows and for fp32 (twice the bytes, no
    tensor cores) so that the resident block stays in registers; at least 16 (``tl.dot``)."""
    block_d = max(16, triton.next_power_of_2(d))
    shrink = max(1, block_d // 128) * (2 if dtype == torch.float32 else 1)
    block_r = max(16, min(MAX_ROWS // shrink, triton.next_power_of_2(max(rows, 1))))
    block_c = max(16, min(MAX_COLS // shrink, triton.next_power_of_2(max(cols, 1))))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
                num_warps=8 if block_r * block_d >= 128 * 128 else 4,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def geometry(q_regions, k_regions, q_image, k_image):
    """Launcher form of the geometric inputs: fp32 contiguous boxes and contiguous ids."""
    return (q_regions.float().contiguous(), q_image.contiguous(),
            k_regions.float().contiguous(), k_image.contiguous())


def forward(q, k, queue, targets, boxes, temperature: float, metric: str = "mgc"):
    """``(row_loss, lse, rho)`` in fp32; ``targets = (index, weight)`` for info_nce, or
    ``boxes = geometry(...)`` for geometric targets (then ``rho`` is filled)."""
    q, k = q.contiguous(), k.contiguous()
    queue = k[:0] if queue is None else queue.contiguous()
    n, d = q.shape
    row_loss, lse, rho = (torch.empty(n, device=q.device, dtype=torch.float32) for _ in range(3))
    index, weight = (q, q) if targets is None else (t.contiguous() for t in targets)
    qbox, qimg, kbox, kimg = (q,) * 4 if boxes is None else boxes
    cfg = config(n, len(k) + len(queue), d, q.dtype)
    _forward_kernel[(triton.cdiv(n, cfg["BLOCK_R"]),)](
        q, k, queue, index, weight, qbox, qimg, kbox, kimg, lse, row_loss, rho,
        n, len(k), len(queue), 0 if targets is None else index.shape[1], d, 1.0 / temperature,
        GEOMETRIC=boxes is not None, METRIC=metric, **cfg)
    return row_loss, lse, rho


def backward(grad_row_loss, q, k, queue, targets, boxes, lse, a, b, temperature: float,
             metric: str = "mgc", need_dk: bool = True):
    """``(dq, dk)`` of ``sum_i grad_i * row_loss_i``, where ``dlogit_ij = a_i * softmax_ij -
    b_i * w_ij`` (geometric ``w`` from ``boxes``) minus the sparse ``targets``, all over tau."""
    q, k = q.contiguous(), k.contiguous()
    queue = k[:0] if queue is None else queue.contiguous()
    (n, d), m = q.shape, len(k)
    g, lse, a = grad_row_loss.float().contiguous(), lse.contiguous(), a.float().contiguous()
    b = a if b is None else b.float().contiguous()
    index, weight = (q, q) if targets is None else (t.contiguous() for t in targets)
    qbox, qimg, kbox, kimg = (q,) * 4 if boxes is None else boxes
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    flags = dict(GEOMETRIC=boxes is not None, METRIC=metric)
    p = 0 if targets is None else index.shape[1]
    cfg = config(n, m + len(queue), d, q.dtype)
    _dq_kernel[(triton.cdiv(n, cfg["BLOCK_R"]),)](
        q, k, queue, index, weight, qbox, qimg, kbox, kimg, lse, g, a, b, dq,
        n, m, len(queue), p, d, 1.0 / temperature, **flags, **cfg)
    if not need_dk:
        return dq, k.new_empty(0, d)
    cfg = config(m, n, d, q.dtype)
    _dk_kernel[(triton.cdiv(m, cfg["BLOCK_R"]),)](
        q, k, index, weight, qbox, qimg, kbox, kimg, lse, g, a, b, dk, n, m, p, d,
        1.0 / temperature, **flags, **cfg)
    return dq, dk


# --------------------------------------------------------------------------- the op


def info_nce(q, k, queue, target_index, target_weight, temperature: float):
    """``(row_loss, lse)``, ``[N]`` fp32 each, as ``reference/info_nce.py::info_nce``."""
    row_loss, lse, _ = forward(q, k, queue, (target_index, target_weight.float()), None,
                               temperature)
    return row_loss, lse


def info_nce_backward(grad_row_loss, q, k, queue, target_index, target_weight, lse,
                      temperature: float, grad_lse=None, need_dk: bool = True):
    """``(dq, dk)`` in the dtypes of ``q`` and ``k``; the queue gets no gradient (see
    ``reference/info_nce.py::info_nce_backward`` for ``grad_lse`` and ``need_dk``).

    The kernels compute ``dlogit = g_i * (a_i * softmax - t_i)``. With an LSE gradient ``c_i``
    the softmax coefficient is ``g_i * s_i + c_i``, so rows are rescaled to ``g'_i = |g_i| + |c_i|``
    with ``a'_i = (g_i * s_i + c_i) / g'_i`` and ``t'_i = t_i * g_i / g'_i``: the same products,
    and every factor stays O(1) for the kernels' fp16 underflow guard."""
    weight = target_weight.float()
    g = grad_row_loss.float()
    a = weight.sum(1)
    if grad_lse is not None:
        c = grad_lse.float()
        scale = g.abs() + c.abs()
        safe = torch.where(scale > 0, scale, 1.0)
        a, weight, g = (g * a + c) / safe, weight * (g / safe)[:, None], scale
    return backward(g, q, k, queue, (target_index, weight), None, lse, a, None, temperature,
                    need_dk=need_dk)
