"""Fused linear soft-target cross-entropy (DINO head + loss): neither the student nor the teacher
``N x K`` logits ever exist in memory.

* ``_forward_kernel``: a program per block of ``BLOCK_R`` rows (looping over several blocks when
  there are more than ``MAX_PROGRAMS``) loops over prototype tiles of ``BLOCK_K``. Per tile it
  computes the student logits ``x @ W^T / tau_s`` and the raw teacher logits ``y @ V^T`` (or
  loads them, ``LOGITS_GIVEN``) with ``tl.dot``, and updates in fp32 the running
  (max, sum-exp) of the student (its lse), the running (max, sum-exp) of the centred teacher
  ``u = (l - c) / tau_t`` and the running ``sum_k exp(u_k - max) s_k``, the last two rescaled
  together when the teacher's max grows. ``CE = lse - (sum exp(u - m) s) / (sum exp(u - m))``.
  It stores ``row_loss``, ``lse`` and ``teacher_lse`` (12 bytes a row).
* ``teacher_mean``: each program adds the column sums of its rows' raw teacher logits into its
  own row of an fp32 ``[programs, K]`` buffer (no other program writes there), summed over
  programs by one ``torch.sum`` afterwards. Chosen over atomic adds into one ``[K]`` buffer
  because the result is then bit-for-bit deterministic (fp32 atomics add in arrival order), and
  over a separate column pass because that would recompute the teacher matmul once more. The
  buffer is at most ``MAX_PROGRAMS x K`` fp32 (``N / BLOCK_R x K`` for moderate N: 23 MB at
  N = 5632, K = 65536, against 1.5 GB for one fp32 copy of the logits).
* ``_dx_kernel``: per row block, recomputes each tile's ``p - t`` (student softmax minus teacher
  distribution, fp32, from the saved lse's) and accumulates ``(p - t) @ W``; the row gradients
  ``g_i / tau_s`` multiply the accumulator at the end (so fp16 tiles of ``p - t`` are not
  pushed towards underflow by a small ``g``).
* ``_dw_kernel``: per prototype block, loops over row blocks and accumulates
  ``((p - t) * g)^T @ x``, the row gradients folded in scaled to ``|g| <= 1`` (as in
  ``info_nce``'s dk kernel).

fp32 inputs use full-precision dots (``input_precision="ieee"``); fp16/bf16 tiles feed the tensor
cores with fp32 accumulation. Row offsets are int64 (``N * K`` logits and ``K * D`` weights can
pass 2**31).

Feature widths: up to ``MAX_RESIDENT_D`` (256, DINO's bottleneck) whole feature rows are resident
(``BLOCK_D = next_pow2(D)``, constexpr ``RESIDENT``): a program loads its own rows once and each
tile's logits are one ``tl.dot``. Wider rows do not fit: at D = 1024 in fp32 the resident rows
and the pipelined prototype tiles need 394 KB of shared memory per block (sm_90 has 227 KB), and
without pipelining they spill. Wider rows are therefore walked in chunks of ``MAX_RESIDENT_D``
columns (``RESIDENT=False``): each tile's logits accumulate one ``tl.dot`` per chunk (reloading
the program's row chunks, from L1/L2), and the dx and dW kernels get a second grid axis over
chunks of their output columns, each program recomputing the tile's full-width logits (the
backward's logit work grows by ``ceil(D / 256)``). Tiles and shared memory then stay those of
D = 256, so every width launches; the benchmarks' widths are compiled for sm_90 in CI
(``tests/triton_aot.py --real``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import load_rows

# the largest tiles at D <= 128: a program's own rows, and the rows of the tiles it loops over
MAX_ROWS, MAX_COLS = 128, 64
MAX_PROGRAMS = 1024  # forward programs (bounds the [programs, K] teacher column-sum buffer)
MAX_RESIDENT_D = 256  # widest resident feature rows; wider ones are walked in chunks this wide


@triton.jit
def _chunked_dot(
    A,
    B,
    a_idx,
    a_mask,
    b_idx,
    b_mask,
    D,
    offs_d,
    acc,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``acc + A[a_idx] @ B[b_idx]^T`` over the ``D`` columns of the row-major ``[*, D]``
    matrices ``A`` and ``B``, one ``BLOCK_D``-wide chunk at a time."""
    for start in range(0, D, BLOCK_D):
        a = load_rows(A, a_idx, a_mask, D, start + offs_d)
        b = load_rows(B, b_idx, b_mask, D, start + offs_d)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _teacher_tile(
    T,
    VT,
    y,
    rows,
    rmask,
    cols,
    cmask,
    K,
    DT,
    offs_dt,
    LOGITS_GIVEN: tl.constexpr,
    T_PRECISION: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    """Raw teacher logits ``[rows, cols]`` in fp32: loaded from ``T [N, K]`` or ``y @ V^T``
    (``y`` the resident teacher rows, or chunks of ``T`` when not ``RESIDENT``)."""
    if LOGITS_GIVEN:
        ptrs = T + rows.to(tl.int64)[:, None] * K + cols[None, :]
        raw = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    elif RESIDENT:
        v = load_rows(VT, cols, cmask, DT, offs_dt)
        raw = tl.dot(y, tl.trans(v), input_precision=T_PRECISION)
    else:
        raw = _chunked_dot(
            T,
            VT,
            rows,
            rmask,
            cols,
            cmask,
            DT,
            offs_dt,
            tl.zeros([rows.shape[0], cols.shape[0]], tl.float32),
            T_PRECISION,
            BLOCK_DT,
        )
    return raw


@triton.jit
def _teacher_tile_t(
    T,
    VT,
    v,
    rows,
    rmask,
    cols,
    cmask,
    K,
    DT,
    offs_dt,
    LOGITS_GIVEN: tl.constexpr,
    T_PRECISION: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    """The transposed tile ``[cols, rows]`` (prototypes on the first axis), for the dW kernel
    (``v`` the resident teacher prototypes when ``RESIDENT``)."""
    if LOGITS_GIVEN:
        ptrs = T + rows.to(tl.int64)[None, :] * K + cols[:, None]
        raw = tl.load(ptrs, mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
    elif RESIDENT:
        y = load_rows(T, rows, rmask, DT, offs_dt)
        raw = tl.dot(v, tl.trans(y), input_precision=T_PRECISION)
    else:
        raw = _chunked_dot(
            VT,
            T,
            cols,
            cmask,
            rows,
            rmask,
            DT,
            offs_dt,
            tl.zeros([cols.shape[0], rows.shape[0]], tl.float32),
            T_PRECISION,
            BLOCK_DT,
        )
    return raw


@triton.jit
def _forward_kernel(
    X,
    W,
    T,
    VT,
    C,
    LOSS,
    LSE,
    TLSE,
    PART,
    N,
    K,
    D,
    DT,
    ITERS,
    inv_tau_s,
    inv_tau_t,
    LOGITS_GIVEN: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dt = tl.arange(0, BLOCK_DT)
    part_row = PART + pid.to(tl.int64) * K
    for it in range(ITERS):
        rows = (pid + it * programs) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        if RESIDENT:
            x = load_rows(X, rows, rmask, D, offs_d)
            y = load_rows(T, rows, rmask, DT, offs_dt)
        else:
            y = None
        m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_R], tl.float32)
        m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_t = tl.zeros([BLOCK_R], tl.float32)
        ts = tl.zeros([BLOCK_R], tl.float32)  # running sum_k exp(u_k - m_t) * s_k
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            cmask = cols < K
            if RESIDENT:
                w = load_rows(W, cols, cmask, D, offs_d)
                s = tl.dot(x, tl.trans(w), input_precision=PRECISION) * inv_tau_s
            else:
                s = (
                    _chunked_dot(
                        X,
                        W,
                        rows,
                        rmask,
                        cols,
                        cmask,
                        D,
                        offs_d,
                        tl.zeros([BLOCK_R, BLOCK_K], tl.float32),
                        PRECISION,
                        BLOCK_D,
                    )
                    * inv_tau_s
                )
            raw = _teacher_tile(
                T,
                VT,
                y,
                rows,
                rmask,
                cols,
                cmask,
                K,
                DT,
                offs_dt,
                LOGITS_GIVEN,
                T_PRECISION,
                RESIDENT,
                BLOCK_DT,
            )
            # this program's column sums of the raw teacher logits (its own buffer row)
            col_sum = tl.sum(tl.where(rmask[:, None], raw, 0.0), 0)
            tl.store(
                part_row + cols,
                tl.load(part_row + cols, mask=cmask, other=0.0) + col_sum,
                mask=cmask,
            )
            if HAS_CENTER:
                raw = raw - tl.load(C + cols, mask=cmask, other=0.0)[None, :]
            u = tl.where(cmask[None, :], raw * inv_tau_t, float("-inf"))
            s_valid = tl.where(cmask[None, :], s, 0.0)
            s = tl.where(cmask[None, :], s, float("-inf"))
            # student: running max and sum-exp
            m_new = tl.maximum(m_s, tl.max(s, 1))
            l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_s = m_new
            # teacher: running max, sum-exp and sum-exp-weighted student logit
            m_new = tl.maximum(m_t, tl.max(u, 1))
            alpha = tl.exp(m_t - m_new)
            e = tl.exp(u - m_new[:, None])
            l_t = l_t * alpha + tl.sum(e, 1)
            ts = ts * alpha + tl.sum(e * s_valid, 1)
            m_t = m_new
        lse = m_s + tl.log(l_s)
        tl.store(LSE + rows, lse, mask=rmask)
        tl.store(TLSE + rows, m_t + tl.log(l_t), mask=rmask)
        tl.store(LOSS + rows, lse - tl.math.div_rn(ts, l_t), mask=rmask)


@triton.jit
def _dx_kernel(
    X,
    W,
    T,
    VT,
    C,
    LSE,
    TLSE,
    G,
    DX,
    N,
    K,
    D,
    DT,
    inv_tau_s,
    inv_tau_t,
    LOGITS_GIVEN: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    # a block of rows, and (when not RESIDENT) one BLOCK_D-wide chunk of their dx columns
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dt = tl.arange(0, BLOCK_DT)
    if RESIDENT:
        out_d = offs_d
        x = load_rows(X, rows, rmask, D, offs_d)
        y = load_rows(T, rows, rmask, DT, offs_dt)
    else:
        out_d = tl.program_id(1) * BLOCK_D + offs_d
        y = None
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    tlse = tl.load(TLSE + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        cmask = cols < K
        if RESIDENT:
            w = load_rows(W, cols, cmask, D, offs_d)
            s = tl.dot(x, tl.trans(w), input_precision=PRECISION) * inv_tau_s
        else:
            s = (
                _chunked_dot(
                    X,
                    W,
                    rows,
                    rmask,
                    cols,
                    cmask,
                    D,
                    offs_d,
                    tl.zeros([BLOCK_R, BLOCK_K], tl.float32),
                    PRECISION,
                    BLOCK_D,
                )
                * inv_tau_s
            )
            w = load_rows(W, cols, cmask, D, out_d)
        raw = _teacher_tile(
            T,
            VT,
            y,
            rows,
            rmask,
            cols,
            cmask,
            K,
            DT,
            offs_dt,
            LOGITS_GIVEN,
            T_PRECISION,
            RESIDENT,
            BLOCK_DT,
        )
        if HAS_CENTER:
            raw = raw - tl.load(C + cols, mask=cmask, other=0.0)[None, :]
        ds = tl.exp(s - lse[:, None]) - tl.exp(raw * inv_tau_t - tlse[:, None])
        # prototypes past K: their zero logits can exceed a row's lse by ~89 (exp overflows)
        ds = tl.where(cmask[None, :], ds, 0.0)
        acc = tl.dot(ds.to(w.dtype), w, acc, input_precision=PRECISION)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    dx = acc * (g * inv_tau_s)[:, None]
    tl.store(
        DX + rows.to(tl.int64)[:, None] * D + out_d[None, :],
        dx.to(DX.dtype.element_ty),
        mask=rmask[:, None] & (out_d < D)[None, :],
    )


@triton.jit
def _dw_kernel(
    X,
    W,
    T,
    VT,
    C,
    LSE,
    TLSE,
    G,
    DW,
    N,
    K,
    D,
    DT,
    inv_tau_s,
    inv_tau_t,
    LOGITS_GIVEN: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    # this program owns BLOCK_K prototypes (and, when not RESIDENT, one BLOCK_D-wide chunk of
    # their dW columns) and loops over row blocks of BLOCK_R
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    offs_d = tl.arange(0, BLOCK_D)
    offs_dt = tl.arange(0, BLOCK_DT)
    if RESIDENT:
        out_d = offs_d
        w = load_rows(W, cols, cmask, D, offs_d)
        v = load_rows(VT, cols, cmask, DT, offs_dt)
    else:
        out_d = tl.program_id(1) * BLOCK_D + offs_d
        v = None
    c = tl.zeros([BLOCK_K], tl.float32)
    if HAS_CENTER:
        c = tl.load(C + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < N
        if RESIDENT:
            x = load_rows(X, rows, rmask, D, offs_d)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        tlse = tl.load(TLSE + rows, mask=rmask, other=0.0)
        if RESIDENT:
            s = tl.dot(w, tl.trans(x), input_precision=PRECISION) * inv_tau_s  # [prototypes, rows]
        else:
            s = (
                _chunked_dot(
                    W,
                    X,
                    cols,
                    cmask,
                    rows,
                    rmask,
                    D,
                    offs_d,
                    tl.zeros([BLOCK_K, BLOCK_R], tl.float32),
                    PRECISION,
                    BLOCK_D,
                )
                * inv_tau_s
            )
            x = load_rows(X, rows, rmask, D, out_d)
        raw = _teacher_tile_t(
            T,
            VT,
            v,
            rows,
            rmask,
            cols,
            cmask,
            K,
            DT,
            offs_dt,
            LOGITS_GIVEN,
            T_PRECISION,
            RESIDENT,
            BLOCK_DT,
        )
        ds = tl.exp(s - lse[None, :]) - tl.exp((raw - c[:, None]) * inv_tau_t - tlse[None, :])
        # rows past N (lse = 0) would meet a very negative centre as exp(-c / tau_t) = inf
        ds = tl.where(rmask[None, :], ds, 0.0)
        g = tl.load(G + rows, mask=rmask, other=0.0)
        g_max = tl.max(tl.abs(g), 0)
        g_max = tl.where(g_max > 0, g_max, 1.0)
        ds = ds * (g * (1.0 / g_max))[None, :]
        acc += tl.dot(ds.to(x.dtype), x, input_precision=PRECISION) * g_max
    tl.store(
        DW + cols.to(tl.int64)[:, None] * D + out_d[None, :],
        (acc * inv_tau_s).to(DW.dtype.element_ty),
        mask=cmask[:, None] & (out_d < D)[None, :],
    )


# --------------------------------------------------------------------------- launchers


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 tiles


def config(rows: int, cols: int, d: int, dt: int, dtype: torch.dtype) -> dict:
    """Fixed tiles for a program owning ``rows`` rows and looping over ``cols``: at most
    ``MAX_ROWS x MAX_COLS`` at feature widths <= 128, shrunk for wider rows (student and teacher
    rows are both resident) and for fp32; at least 16 (``tl.dot``). Rows wider than
    ``MAX_RESIDENT_D`` are walked in chunks that wide, with the tiles of that width."""
    block_d = max(16, triton.next_power_of_2(d))
    block_dt = max(16, triton.next_power_of_2(dt))
    resident = max(block_d, block_dt) <= MAX_RESIDENT_D
    if not resident:
        block_d, block_dt = min(block_d, MAX_RESIDENT_D), min(block_dt, MAX_RESIDENT_D)
    shrink = max(1, max(block_d, block_dt) // 128) * (2 if dtype == torch.float32 else 1)
    block_r = max(16, min(MAX_ROWS // shrink, triton.next_power_of_2(max(rows, 1))))
    block_c = max(16, min(MAX_COLS // shrink, triton.next_power_of_2(max(cols, 1))))
    # chunks hold a logit accumulator beside the chunk tiles: 8 warps keep fp32 from spilling
    wide = not resident or block_r * max(block_d, block_dt) >= 128 * 128
    return (
        dict(
            BLOCK_D=block_d,
            BLOCK_DT=block_dt,
            RESIDENT=resident,
            PRECISION=_precision(dtype),
            num_warps=8 if wide else 4,
        ),
        block_r,
        block_c,
    )


def _inputs(student, student_weight, teacher, teacher_weight, center):
    x, w, t = student.contiguous(), student_weight.contiguous(), teacher.contiguous()
    given = teacher_weight is None
    v = t if given else teacher_weight.contiguous()
    c = x if center is None else center.float().contiguous()
    dt = 0 if given else t.shape[1]
    flags = dict(LOGITS_GIVEN=given, HAS_CENTER=center is not None, T_PRECISION=_precision(t.dtype))
    return x, w, t, v, c, dt, flags


def linear_soft_ce(
    student,
    student_weight,
    teacher,
    teacher_weight,
    center,
    student_temperature: float,
    teacher_temperature: float,
):
    """``(row_loss, lse, teacher_lse, teacher_mean)`` in fp32, as the reference op."""
    x, w, t, v, c, dt, flags = _inputs(student, student_weight, teacher, teacher_weight, center)
    (n, d), k = x.shape, len(w)
    cfg, block_r, block_k = config(n, k, d, dt, x.dtype)
    blocks = triton.cdiv(n, block_r)
    programs = min(blocks, MAX_PROGRAMS)
    row_loss, lse, teacher_lse = (
        torch.empty(n, device=x.device, dtype=torch.float32) for _ in range(3)
    )
    partial = torch.zeros(programs, k, device=x.device, dtype=torch.float32)
    _forward_kernel[(programs,)](
        x,
        w,
        t,
        v,
        c,
        row_loss,
        lse,
        teacher_lse,
        partial,
        n,
        k,
        d,
        dt,
        triton.cdiv(blocks, programs),
        1.0 / student_temperature,
        1.0 / teacher_temperature,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        **flags,
        **cfg,
    )
    return row_loss, lse, teacher_lse, partial.sum(0) / n


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
    """``(d_student, d_student_weight)`` in the dtypes of the inputs."""
    x, w, t, v, c, dt, flags = _inputs(student, student_weight, teacher, teacher_weight, center)
    (n, d), k = x.shape, len(w)
    g = grad_row_loss.float().contiguous()
    lse, teacher_lse = lse.float().contiguous(), teacher_lse.float().contiguous()
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    args = (n, k, d, dt, 1.0 / student_temperature, 1.0 / teacher_temperature)
    cfg, block_r, block_k = config(n, k, d, dt, x.dtype)
    chunks = triton.cdiv(d, cfg["BLOCK_D"])  # 1 when the rows are resident
    _dx_kernel[(triton.cdiv(n, block_r), chunks)](
        x,
        w,
        t,
        v,
        c,
        lse,
        teacher_lse,
        g,
        dx,
        *args,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        **flags,
        **cfg,
    )
    cfg, block_k, block_r = config(k, n, d, dt, x.dtype)
    _dw_kernel[(triton.cdiv(k, block_k), chunks)](
        x,
        w,
        t,
        v,
        c,
        lse,
        teacher_lse,
        g,
        dw,
        *args,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        **flags,
        **cfg,
    )
    return dx, dw
