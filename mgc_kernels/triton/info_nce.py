"""Fused InfoNCE shaped like attention: the logits live only as register tiles, never in memory.

One kernel family serves ``info_nce`` and ``geometric_info_nce`` (constexpr ``GEOMETRIC``; both
ops launch it through :func:`forward` and :func:`key_grad`). With
``s = q k^T / tau``, ``p = softmax(s)`` over the keys and the queue, row coefficient ``a_i`` (the
target mass, or ``[rho_i > 0]``) and targets ``t_ij``, the row gradient splits exactly into a dense
softmax part and a sparse target part: ``dlogit_i = a_i p_i - t_i``. The targets are non-zero only
in a few key tiles per query block (the *band*: a pair's own key, the regions of the same image),
which the launcher finds from the targets (or the sorted image ids) before the kernels run.

* ``_forward_kernel``, a program per ``BLOCK_R`` query rows: attention's forward with the keys as
  the values. Sweep 1 visits the band tiles (the running max and sum only, plus the geometric
  ``rho_i`` and ``sum_j w_ij s_ij``), then every other key tile and the queue (never
  concatenated) in the hot loop: a load, two dots, ``exp`` and the running max, ``acc`` holding
  ``sum_j exp(s_ij - m_i) k_j``. Sweep 2 revisits the band tiles with the final log-sum-exp and
  adds ``(a_i p_ij - t_ij) k_j``, formed in fp32 before the tile is rounded to the input dtype.
  It stores ``lse``, the row loss, ``rho`` and ``v_i = sum_j (a_i p_ij - t_ij) k_j``, from which
  ``dq_i = g_i v_i / tau`` follows with no further pass.
* ``_dk_kernel``, a program per ``BLOCK_R`` keys (skipped when ``k`` needs no gradient, and the
  queue never gets one): the same loop shape over query tiles, ``p^T`` recomputed from the saved
  lse, ``acc += (coef * p)^T q``; the band tiles subtract the targets in fp32 first. No atomics:
  deterministic.

Why the band is handled apart and not rounded with the rest (the precision study,
``python -m benchmarks.info_nce_precision``): rounding ``p`` to bf16 costs each entry ``u p``;
outside the targets that is relative to the gradient itself, but where a row is converged the
gradient ``a p - t`` is the small difference of two large terms, and rounding ``p`` before
subtracting ``t`` loses ``u / (1 - p_pos)`` of it. Four N x M x D matmul passes in all (two
without dk) plus the band tiles' extra dot.

The forward works in base 2 (``log2(e) / tau`` folded into the logits' scale, ``exp2`` in the
loops: one multiply less per logit) and returns the lse in natural units; its band sweep uses its
own base-2 lse, so the two sweeps agree exactly. dk stays in natural units: the saved lse then
cancels exactly against the identically rounded logits it recomputes (a saturated row gets
p = 1, not 1 - ulp(lse) from converting the lse between bases). fp32 inputs use full-precision dots
(``input_precision="ieee"``; tf32 would not meet the tolerance rule); fp16/bf16 tiles feed the
tensor cores with fp32 accumulation. Row offsets are int64 (``rows * D`` passes 2**31 for a large
queue). The tiles come from the plans in ``triton/tiles.py``: on CUDA, 16-bit rows up to 128
wide, Triton's autotuner picks them among ``tiles.TUNED`` once per problem; elsewhere (fp32,
wider rows, the interpreter) they are fixed per feature width. The band arrays are made before
the tiles are known, per group of ``BAND_R`` rows; a block's band is the union of its groups'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import box_metric, dk_plan, forward_plan, launch, load_rows, tile_band

# what a tuned choice holds for: the sizes, the variant, and (Triton adds them) the dtypes
FORWARD_KEY = ("N", "M", "NU", "P", "D", "GEOMETRIC", "METRIC", "WITH_V")
DK_KEY = ("N", "M", "P", "D", "GEOMETRIC", "METRIC")


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _load_boxes(BOX, IMG, idx, mask):
    """``(x0, y0, x1, y1, image)`` of rows ``idx`` of fp32 boxes ``[*, 4]`` and image ids.
    Masked rows get the unit box, so that no lane divides 0 by 0 (the ops check that real
    boxes have positive areas)."""
    box = BOX + idx.to(tl.int64) * 4
    return (
        tl.load(box, mask=mask, other=0.0),
        tl.load(box + 1, mask=mask, other=0.0),
        tl.load(box + 2, mask=mask, other=1.0),
        tl.load(box + 3, mask=mask, other=1.0),
        tl.load(IMG + idx, mask=mask, other=-1),
    )


@triton.jit
def _geometric_tile(
    QBOX, QIMG, KBOX, KIMG, rows, rmask, keys, kmask, METRIC: tl.constexpr, KEYS_FIRST: tl.constexpr
):
    """``w_ij = metric(query box i, key box j)`` where both come from one image, else 0."""
    qx0, qy0, qx1, qy1, q_img = _load_boxes(QBOX, QIMG, rows, rmask)
    kx0, ky0, kx1, ky1, k_img = _load_boxes(KBOX, KIMG, keys, kmask)
    if KEYS_FIRST:
        same = (k_img[:, None] == q_img[None, :]) & kmask[:, None] & rmask[None, :]
        w = box_metric(
            qx0[None, :],
            qy0[None, :],
            qx1[None, :],
            qy1[None, :],
            kx0[:, None],
            ky0[:, None],
            kx1[:, None],
            ky1[:, None],
            METRIC,
        )
    else:
        same = (q_img[:, None] == k_img[None, :]) & rmask[:, None] & kmask[None, :]
        w = box_metric(
            qx0[:, None],
            qy0[:, None],
            qx1[:, None],
            qy1[:, None],
            kx0[None, :],
            ky0[None, :],
            kx1[None, :],
            ky1[None, :],
            METRIC,
        )
    return tl.where(same, w, 0.0)


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


@triton.jit
def _sparse_tile(TI, TW, rows, rmask, keys, P, M, KEYS_FIRST: tl.constexpr):
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
def _targets(
    TI,
    TW,
    QBOX,
    QIMG,
    KBOX,
    KIMG,
    rows,
    rmask,
    keys,
    kmask,
    P,
    M,
    GEOMETRIC: tl.constexpr,
    METRIC: tl.constexpr,
    KEYS_FIRST: tl.constexpr,
):
    """A band tile's targets: the geometric weights ``w`` (not yet divided by ``rho``) or the
    sparse target distribution."""
    if GEOMETRIC:
        return _geometric_tile(QBOX, QIMG, KBOX, KIMG, rows, rmask, keys, kmask, METRIC, KEYS_FIRST)
    return _sparse_tile(TI, TW, rows, rmask, keys, P, M, KEYS_FIRST)


@triton.jit
def _logits(
    q,
    X,
    first,
    n,
    D,
    offs_d,
    scale,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``(columns, their mask, the key tile, q x^T * scale)`` of the tile starting at ``first``;
    without ``MASKED`` the tile lies within the ``n`` rows and loads unmasked."""
    cols = first + tl.arange(0, BLOCK_C)
    cmask = cols < n
    if MASKED:
        x = load_rows(X, cols, cmask, D, offs_d)
    else:
        x = tl.load(
            X + cols.to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=(offs_d < D)[None, :],
            other=0.0,
        )
    return cols, cmask, x, tl.dot(q, tl.trans(x), input_precision=PRECISION) * scale


@triton.jit
def _softmax_tiles(
    q,
    X,
    start,
    stop,
    D,
    offs_d,
    scale,
    m_i,
    l_i,
    acc,
    WITH_V: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The hot loop over rows ``[start, stop)`` of ``X``, keys and values at once: the running
    max ``m``, sum ``l`` and ``acc = sum_j 2**(s_ij - m_i) x_j`` of the base-2 logits
    ``s = q x^T * scale``; whole tiles unmasked, then the ragged last one."""
    full = start + (stop - start) // BLOCK_C * BLOCK_C
    m_i, l_i, acc = _softmax_loop(
        q, X, start, full, stop, D, offs_d, scale, m_i, l_i, acc, WITH_V, PRECISION, BLOCK_C, False
    )
    return _softmax_loop(
        q, X, full, stop, stop, D, offs_d, scale, m_i, l_i, acc, WITH_V, PRECISION, BLOCK_C, True
    )


@triton.jit
def _softmax_loop(
    q,
    X,
    start,
    stop,
    n,
    D,
    offs_d,
    scale,
    m_i,
    l_i,
    acc,
    WITH_V: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASKED: tl.constexpr,
):
    for first in range(start, stop, BLOCK_C):
        cols, cmask, x, s = _logits(q, X, first, n, D, offs_d, scale, PRECISION, BLOCK_C, MASKED)
        if MASKED:
            s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_V:
            acc = tl.dot(p.to(x.dtype), x, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _band(BAND, block, GROUPS: tl.constexpr):
    """``[lo, hi)``: the range of the looped-over rows where ``block`` has targets, the union of
    its ``GROUPS`` groups' ranges (empty ones are ``[limit, 0)``), or ``[0, 0)``."""
    group = block * GROUPS + tl.arange(0, GROUPS)
    lo = tl.min(tl.load(BAND + 2 * group), 0)
    hi = tl.max(tl.load(BAND + 2 * group + 1), 0)
    empty = hi <= lo
    return tl.where(empty, 0, lo), tl.where(empty, 0, hi)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(
    Q,
    K,
    U,
    TI,
    TW,
    QBOX,
    QIMG,
    KBOX,
    KIMG,
    BAND,
    LSE,
    LOSS,
    RHO,
    V,
    N,
    M,
    NU,
    P,
    D,
    inv_tau,
    GEOMETRIC: tl.constexpr,
    METRIC: tl.constexpr,
    WITH_V: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BAND_R: tl.constexpr,
    BAND_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, rows, rmask, D, offs_d)
    scale = inv_tau * 1.4426950408889634  # log2(e) / tau: base-2 logits, exp2 in the loops
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    rho = tl.zeros([BLOCK_R], tl.float32)
    w_logit = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    lo, hi = _band(BAND, tl.program_id(0), BLOCK_R // BAND_R)
    # sweep 1: the band first, while acc is still 0 (its softmax enters acc exactly in sweep 2)
    for first in range(lo, hi, BAND_C):
        cols, cmask, kt, s = _logits(q, K, first, M, D, offs_d, scale, PRECISION, BAND_C, True)
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
        if GEOMETRIC:
            w = _geometric_tile(QBOX, QIMG, KBOX, KIMG, rows, rmask, cols, cmask, METRIC, False)
            rho += tl.sum(w, 1)
            w_logit += tl.sum(tl.where(w > 0, w * s, 0.0), 1)
    # the hot loop's last tile before the band is masked at lo (it may overshoot into the band)
    m_i, l_i, acc = _softmax_tiles(
        q, K, 0, lo, D, offs_d, scale, m_i, l_i, acc, WITH_V, PRECISION, BLOCK_C
    )
    m_i, l_i, acc = _softmax_tiles(
        q, K, hi, M, D, offs_d, scale, m_i, l_i, acc, WITH_V, PRECISION, BLOCK_C
    )
    m_i, l_i, acc = _softmax_tiles(
        q, U, 0, NU, D, offs_d, scale, m_i, l_i, acc, WITH_V, PRECISION, BLOCK_C
    )
    lse2 = m_i + tl.log2(l_i)
    lse = lse2 * 0.6931471805599453  # ln(2): the natural-unit lse the op returns
    if GEOMETRIC:
        # rho_i * CE_i / rho_i: [rho > 0] * lse - sum_j w_ij * logit_ij / rho_i
        a = tl.where(rho > 0, 1.0, 0.0)
        inv_rho = tl.math.div_rn(a, tl.where(rho > 0, rho, 1.0))
        loss = a * lse - w_logit * 0.6931471805599453 * inv_rho
        tl.store(RHO + rows, rho, mask=rmask)
    else:
        a = tl.zeros([BLOCK_R], tl.float32)
        picked = tl.zeros([BLOCK_R], tl.float32)
        q32 = q.to(tl.float32)
        for p in range(P):
            idx, t, tmask = _target(TI, TW, rows, rmask, p, P, M)
            k_row = load_rows(K, idx, tmask, D, offs_d).to(tl.float32)
            a += t
            picked += t * tl.sum(q32 * k_row, 1)
        loss = a * lse - picked * inv_tau
        # rows without targets keep the plain attention output (the lse gradient's direction)
        a = tl.where(a > 0, a, 1.0)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(LOSS + rows, loss, mask=rmask)
    if WITH_V:
        acc = acc * (a / l_i)[:, None]
        # sweep 2: the band's a p - t in fp32, rounded once
        for first in range(lo, hi, BAND_C):
            cols, cmask, kt, s = _logits(q, K, first, M, D, offs_d, scale, PRECISION, BAND_C, True)
            t = _targets(
                TI,
                TW,
                QBOX,
                QIMG,
                KBOX,
                KIMG,
                rows,
                rmask,
                cols,
                cmask,
                P,
                M,
                GEOMETRIC,
                METRIC,
                False,
            )
            if GEOMETRIC:
                t = t * inv_rho[:, None]
            ds = tl.where(cmask[None, :], tl.exp2(s - lse2[:, None]) * a[:, None] - t, 0.0)
            acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PRECISION)
        tl.store(
            V + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
            acc,
            mask=rmask[:, None] & (offs_d < D)[None, :],
        )


@triton.jit
def _dk_kernel(
    Q,
    K,
    TI,
    TW,
    QBOX,
    QIMG,
    KBOX,
    KIMG,
    BAND,
    LSE,
    COEF,
    TCOEF,
    SCALE,
    DK,
    N,
    M,
    P,
    D,
    inv_tau,
    GEOMETRIC: tl.constexpr,
    METRIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BAND_R: tl.constexpr,
    BAND_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dk_j = scale / tau * sum_i (coef_i p_ij - tcoef_i t_ij) q_i``; ``coef`` and ``tcoef``
    are the rows' gradients divided by ``scale`` so that fp16 tiles cannot underflow."""
    keys = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kmask = keys < M
    offs_d = tl.arange(0, BLOCK_D)
    kt = load_rows(K, keys, kmask, D, offs_d)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    lo, hi = _band(BAND, tl.program_id(0), BLOCK_R // BAND_R)
    # the last tile before the band is masked at lo (it may overshoot into the band)
    acc = _dk_tiles(kt, Q, LSE, COEF, 0, lo, D, offs_d, inv_tau, acc, PRECISION, BLOCK_C)
    # the band: the targets enter the tile in fp32, before its rounding
    for first in range(lo, hi, BAND_C):
        rows, rmask, q, s = _logits(kt, Q, first, N, D, offs_d, inv_tau, PRECISION, BAND_C, True)
        t = _targets(
            TI, TW, QBOX, QIMG, KBOX, KIMG, rows, rmask, keys, kmask, P, M, GEOMETRIC, METRIC, True
        )
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        coef = tl.load(COEF + rows, mask=rmask, other=0.0)
        tcoef = tl.load(TCOEF + rows, mask=rmask, other=0.0)
        ds = tl.exp(s - lse[None, :]) * coef[None, :] - t * tcoef[None, :]
        acc = tl.dot(ds.to(q.dtype), q, acc, input_precision=PRECISION)
    acc = _dk_tiles(kt, Q, LSE, COEF, hi, N, D, offs_d, inv_tau, acc, PRECISION, BLOCK_C)
    scale = tl.load(SCALE) * inv_tau
    tl.store(
        DK + keys.to(tl.int64)[:, None] * D + offs_d[None, :],
        (acc * scale).to(DK.dtype.element_ty),
        mask=kmask[:, None] & (offs_d < D)[None, :],
    )


@triton.jit
def _dk_tiles(
    kt,
    Q,
    LSE,
    COEF,
    start,
    stop,
    D,
    offs_d,
    inv_tau,
    acc,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dk's hot loop over query rows ``[start, stop)``: ``acc += (coef * p)^T q``; whole tiles
    unmasked, then the ragged last one."""
    full = start + (stop - start) // BLOCK_C * BLOCK_C
    acc = _dk_loop(
        kt, Q, LSE, COEF, start, full, stop, D, offs_d, inv_tau, acc, PRECISION, BLOCK_C, False
    )
    return _dk_loop(
        kt, Q, LSE, COEF, full, stop, stop, D, offs_d, inv_tau, acc, PRECISION, BLOCK_C, True
    )


@triton.jit
def _dk_loop(
    kt,
    Q,
    LSE,
    COEF,
    start,
    stop,
    n,
    D,
    offs_d,
    inv_tau,
    acc,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Queries past ``n`` load as 0 rows with ``coef = 0``: they add nothing."""
    for first in range(start, stop, BLOCK_C):
        rows, rmask, q, s = _logits(kt, Q, first, n, D, offs_d, inv_tau, PRECISION, BLOCK_C, MASKED)
        if MASKED:
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            coef = tl.load(COEF + rows, mask=rmask, other=0.0)
        else:
            lse = tl.load(LSE + rows)
            coef = tl.load(COEF + rows)
        ds = tl.exp(s - lse[None, :]) * coef[None, :]
        acc = tl.dot(ds.to(q.dtype), q, acc, input_precision=PRECISION)
    return acc


# --------------------------------------------------------------------------- launchers


def sparse_bands(index, weight, n: int, m: int, cfg: dict, dk_cfg: dict | None):
    """The bands of sparse targets: per group of query rows the keys it targets (forward, groups
    and tiles of ``cfg``), and per group of keys the queries that target it (dk, ``dk_cfg``)."""
    valid = (weight != 0) & (index >= 0) & (index < m)
    rows = torch.arange(n, device=index.device)[:, None].expand_as(index)
    forward = _group_range(rows, index, valid, n, cfg["BAND_R"], cfg["BAND_C"], m)
    if dk_cfg is None:
        return forward, None
    return forward, _group_range(index, rows, valid, m, dk_cfg["BAND_R"], dk_cfg["BAND_C"], n)


def _group_range(owner, other, valid, owners: int, per_group: int, tile: int, limit: int):
    """For each group of ``per_group`` owners, the tile-aligned range of the ``other`` entries
    that valid targets pair with it."""
    groups = triton.cdiv(owners, per_group)
    owner, other, valid = (x.reshape(-1) for x in (owner, other, valid))
    group = torch.where(valid, torch.div(owner, per_group, rounding_mode="floor"), groups)
    lo = torch.full((groups + 1,), limit, device=owner.device, dtype=torch.int64)
    hi = torch.zeros(groups + 1, device=owner.device, dtype=torch.int64)
    lo = lo.scatter_reduce(0, group, other, "amin")
    hi = hi.scatter_reduce(0, group, other + 1, "amax")
    return tile_band(lo[:groups], hi[:groups], tile, limit)


def forward(q, k, queue, targets, boxes, band, temperature: float, metric: str, with_v: bool):
    """``(row_loss, lse, rho, v)`` in fp32 (``v`` empty without ``with_v``); ``targets =
    (index, weight)`` for info_nce, or ``boxes`` from ``geometric_info_nce.geometry`` (rows
    sorted by image) for geometric targets (then ``rho`` is filled); ``band`` from
    :func:`sparse_bands` or ``geometric_info_nce.image_band`` with ``tiles.forward_plan``'s
    settings."""
    q, k = q.contiguous(), k.contiguous()
    queue = k[:0] if queue is None else queue.contiguous()
    n, d = q.shape
    row_loss, lse, rho = (torch.empty(n, device=q.device, dtype=torch.float32) for _ in range(3))
    v = torch.empty(n if with_v else 0, d, device=q.device, dtype=torch.float32)
    index, weight = (q, q) if targets is None else targets
    qbox, qimg, kbox, kimg = (q,) * 4 if boxes is None else boxes
    launch(
        _forward_kernel,
        FORWARD_KEY,
        forward_plan(q, k, queue),
        n,
        q,
        k,
        queue,
        index,
        weight,
        qbox,
        qimg,
        kbox,
        kimg,
        band,
        lse,
        row_loss,
        rho,
        v,
        n,
        len(k),
        len(queue),
        0 if targets is None else index.shape[1],
        d,
        1.0 / temperature,
        GEOMETRIC=boxes is not None,
        METRIC=metric,
        WITH_V=with_v,
    )
    return row_loss, lse, rho, v


def key_grad(q, k, targets, boxes, band, lse, coef, tcoef, temperature: float, metric: str = "mgc"):
    """``dk_j = sum_i (coef_i p_ij - tcoef_i t_ij) q_j / tau`` in ``k``'s dtype; ``band`` from
    :func:`sparse_bands` or ``geometric_info_nce.image_band`` with ``tiles.dk_plan``'s
    settings."""
    q, k = q.contiguous(), k.contiguous()
    (n, d), m = q.shape, len(k)
    scale = torch.maximum(coef.abs().amax(), tcoef.abs().amax()) if n else coef.new_ones(())
    scale = torch.where(scale > 0, scale, 1.0).reshape(1)
    coef, tcoef = (coef / scale).contiguous(), (tcoef / scale).contiguous()
    index, weight = (q, q) if targets is None else targets
    qbox, qimg, kbox, kimg = (q,) * 4 if boxes is None else boxes
    dk = torch.empty_like(k)
    launch(
        _dk_kernel,
        DK_KEY,
        dk_plan(q, k),
        m,
        q,
        k,
        index,
        weight,
        qbox,
        qimg,
        kbox,
        kimg,
        band,
        lse.contiguous(),
        coef,
        tcoef,
        scale,
        dk,
        n,
        m,
        0 if targets is None else index.shape[1],
        d,
        1.0 / temperature,
        GEOMETRIC=boxes is not None,
        METRIC=metric,
    )
    return dk


# --------------------------------------------------------------------------- the op


def info_nce(q, k, queue, target_index, target_weight, temperature: float, need_v: bool = True):
    """``(row_loss, lse, v)`` as ``reference/info_nce.py::info_nce``."""
    targets = (target_index.contiguous(), target_weight.float().contiguous())
    band, _ = sparse_bands(*targets, len(q), len(k), forward_plan(q, k, queue), None)
    row_loss, lse, _, v = forward(q, k, queue, targets, None, band, temperature, "mgc", need_v)
    return row_loss, lse, v


def info_nce_backward(
    grad_row_loss, q, k, queue, target_index, target_weight, lse, temperature: float, grad_lse=None
):
    """``dk`` in ``k``'s dtype, as ``reference/info_nce.py::info_nce_backward``: the softmax
    coefficient of row ``i`` is ``g_i * a_i + c_i`` (``c`` the LSE gradient), its targets'
    ``g_i``."""
    targets = (target_index.contiguous(), target_weight.float().contiguous())
    g = grad_row_loss.float()
    coef = g * targets[1].sum(1)
    if grad_lse is not None:
        coef = coef + grad_lse.float()
    _, band = sparse_bands(*targets, len(q), len(k), forward_plan(q, k), dk_plan(q, k))
    return key_grad(q, k, targets, None, band, lse, coef, g, temperature)
