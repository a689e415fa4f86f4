"""Triton kernels for ``multigrain_pool``: every granularity from one read of the token grid.

Forward (``_pool_fwd_kernel``): one program per (image, block of ``BLOCK_C`` channels). When the
padded grid has at most ``ONE_TILE_MAX_TOKENS`` tokens (grid <= 16, so every ViT-B/16 at 224 px),
the program loads its whole ``[grid*grid (padded to a power of two), BLOCK_C]`` tile once and writes
every requested granularity from it:

- cell 1 is a plain copy of the tile;
- a cell with at most ``SMALL_REGIONS`` regions (7 and 14 on grid 14) is a masked fp32 sum per
  region over the tile;
- any other cell (2 on grid 14: 49 regions) is a one-hot pooling matrix ``P [BLOCK_R, T_PAD]``
  built in registers from the region ids, times the tile, ``tl.dot`` with fp32 accumulation.
  ``P`` holds 0 and 1, exact in every input dtype, so the products are exact; fp32 tokens use
  ``input_precision="ieee"`` so that nothing is rounded to tf32.

Sums are scaled by ``1 / c**2`` in fp32 and stored in the tokens' dtype.

Larger grids do not fit one tile in registers: the kernel (constexpr ``ONE_TILE=False``) then walks
each granularity in blocks of ``BLOCK_R`` regions and, for each, only the contiguous band of token
rows those regions cover, in ``BLOCK_T``-token chunks through the same one-hot ``tl.dot``. Tokens
are then re-read once per granularity (from L2 in practice, from HBM once).

Backward (``_pool_bwd_kernel``): one program per (image, block of ``BLOCK_T`` tokens, block of
``BLOCK_C`` channels) gathers, for every granularity, the gradient row of the region each token
lies in, scales it by ``1 / c**2``, sums over granularities in fp32 (in the order of ``cells``, as
the reference does) and writes each token's gradient once: a scatter written as a gather, so no
atomics, and deterministic.

Granularities per launch: up to ``MAX_CELLS_PER_LAUNCH`` (4) constexpr slots. More cells take one
launch per group of four: the forward then reads the tokens once per group, and the backward
accumulates the groups in an fp32 buffer that is cast to the gradients' dtype at the end.

Cost (not yet measured on a GPU): bf16/fp16 tiles go through tensor cores, where the one-hot
products cost little next to the memory traffic; the fp32 ieee ``tl.dot`` runs on FMA units
(64 x 256 multiply-adds per channel for cell 2 of grid 14) and may be compute-bound.

Offsets: the per-image base offset is int64 (``B * grid*grid * C`` may pass 2**31); offsets inside
one image (``grid*grid * C`` elements) are int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CELLS_PER_LAUNCH = 4
ONE_TILE_MAX_TOKENS = 256  # padded tokens held by one forward program (grid <= 16)
SMALL_REGIONS = tl.constexpr(4)  # cells with at most this many regions: masked sums, not tl.dot
_MAX_REGION_BLOCK = 64  # regions per tl.dot (rows of the one-hot pooling matrix)


# ----------------------------------------------------------------------------------- forward --


@triton.jit
def _region_of(tok, GRID: tl.constexpr, CELL: tl.constexpr):
    """Row-major region id (over the ``GRID // CELL`` pooled grid) of each token index."""
    return (tok // GRID // CELL) * (GRID // CELL) + (tok % GRID) // CELL


@triton.jit
def _pool_dot(p, x, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(p, x, acc, input_precision="ieee")
    else:
        return tl.dot(p, x, acc)


@triton.jit
def _pool_tile(
    x,
    tok,
    o_ptr,
    pid_b,
    ch,
    cmask,
    C,
    GRID: tl.constexpr,
    CELL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Write one granularity from the tile ``x [T_PAD, BLOCK_C]`` (padded tokens hold zeros)."""
    R: tl.constexpr = (GRID // CELL) * (GRID // CELL)
    INV: tl.constexpr = 1.0 / (CELL * CELL)
    o_base = o_ptr + pid_b * (R * C)
    if CELL == 1:
        tl.store(
            o_base + tok[:, None] * C + ch[None, :], x, mask=(tok < R)[:, None] & cmask[None, :]
        )
    else:
        region = _region_of(tok, GRID, CELL)  # >= R for padded tokens
        if R <= SMALL_REGIONS:
            xf = x.to(tl.float32)
            for r in tl.static_range(R):
                s = tl.sum(tl.where((region == r)[:, None], xf, 0.0), axis=0)
                tl.store(o_base + r * C + ch, (s * INV).to(o_ptr.dtype.element_ty), mask=cmask)
        else:
            for r0 in tl.static_range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                p = (region[None, :] == rows[:, None]).to(x.dtype)
                acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
                acc = _pool_dot(p, x, acc, IEEE)
                tl.store(
                    o_base + rows[:, None] * C + ch[None, :],
                    (acc * INV).to(o_ptr.dtype.element_ty),
                    mask=(rows < R)[:, None] & cmask[None, :],
                )


@triton.jit
def _pool_chunked(
    x_base,
    o_ptr,
    pid_b,
    ch,
    cmask,
    C,
    GRID: tl.constexpr,
    CELL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One granularity of a grid too large for one tile: blocks of regions, each from the band of
    token rows it covers, loaded ``BLOCK_T`` tokens at a time."""
    N: tl.constexpr = GRID // CELL
    R: tl.constexpr = N * N
    T: tl.constexpr = GRID * GRID
    INV: tl.constexpr = 1.0 / (CELL * CELL)
    o_base = o_ptr + pid_b * (R * C)
    if CELL == 1:
        for t0 in range(0, T, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            mask = (tok < T)[:, None] & cmask[None, :]
            offs = tok[:, None] * C + ch[None, :]
            tl.store(o_base + offs, tl.load(x_base + offs, mask=mask), mask=mask)
    else:
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            last = tl.minimum(r0 + BLOCK_R, R) - 1  # last region of this block
            t_lo = (r0 // N) * (CELL * GRID)  # first token row of its region row
            t_hi = (last // N + 1) * (CELL * GRID)  # end of the last region row
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tok = t0 + tl.arange(0, BLOCK_T)
                inside = tok < t_hi
                x = tl.load(
                    x_base + tok[:, None] * C + ch[None, :],
                    mask=inside[:, None] & cmask[None, :],
                    other=0.0,
                )
                region = _region_of(tok, GRID, CELL)
                p = ((region[None, :] == rows[:, None]) & inside[None, :]).to(x.dtype)
                acc = _pool_dot(p, x, acc, IEEE)
            tl.store(
                o_base + rows[:, None] * C + ch[None, :],
                (acc * INV).to(o_ptr.dtype.element_ty),
                mask=(rows < R)[:, None] & cmask[None, :],
            )


@triton.jit
def _pool_fwd_kernel(
    x_ptr,
    o0,
    o1,
    o2,
    o3,
    C,
    GRID: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    R0: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Slots ``C0..C3`` hold cell sizes (0: unused slot), ``R0..R3`` their region block sizes."""
    pid_b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    T: tl.constexpr = GRID * GRID
    x_base = x_ptr + pid_b * (T * C)
    if ONE_TILE:
        tok = tl.arange(0, BLOCK_T)
        x = tl.load(
            x_base + tok[:, None] * C + ch[None, :],
            mask=(tok < T)[:, None] & cmask[None, :],
            other=0.0,
        )
        if C0 > 0:
            _pool_tile(x, tok, o0, pid_b, ch, cmask, C, GRID, C0, R0, BLOCK_C, IEEE)
        if C1 > 0:
            _pool_tile(x, tok, o1, pid_b, ch, cmask, C, GRID, C1, R1, BLOCK_C, IEEE)
        if C2 > 0:
            _pool_tile(x, tok, o2, pid_b, ch, cmask, C, GRID, C2, R2, BLOCK_C, IEEE)
        if C3 > 0:
            _pool_tile(x, tok, o3, pid_b, ch, cmask, C, GRID, C3, R3, BLOCK_C, IEEE)
    else:
        if C0 > 0:
            _pool_chunked(x_base, o0, pid_b, ch, cmask, C, GRID, C0, R0, BLOCK_T, BLOCK_C, IEEE)
        if C1 > 0:
            _pool_chunked(x_base, o1, pid_b, ch, cmask, C, GRID, C1, R1, BLOCK_T, BLOCK_C, IEEE)
        if C2 > 0:
            _pool_chunked(x_base, o2, pid_b, ch, cmask, C, GRID, C2, R2, BLOCK_T, BLOCK_C, IEEE)
        if C3 > 0:
            _pool_chunked(x_base, o3, pid_b, ch, cmask, C, GRID, C3, R3, BLOCK_T, BLOCK_C, IEEE)


# ---------------------------------------------------------------------------------- backward --


@triton.jit
def _spread(g_ptr, pid_b, tok, ch, mask, C, GRID: tl.constexpr, CELL: tl.constexpr):
    """Each token's share (``1 / c**2``) of the gradient of the region it lies in, in fp32."""
    R: tl.constexpr = (GRID // CELL) * (GRID // CELL)
    INV: tl.constexpr = 1.0 / (CELL * CELL)
    region = _region_of(tok, GRID, CELL)
    g = tl.load(g_ptr + pid_b * (R * C) + region[:, None] * C + ch[None, :], mask=mask, other=0.0)
    return g.to(tl.float32) * INV


@triton.jit
def _pool_bwd_kernel(
    g0,
    g1,
    g2,
    g3,
    out_ptr,
    C,
    GRID: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    T: tl.constexpr = GRID * GRID
    mask = (tok < T)[:, None] & (ch < C)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if C0 > 0:
        acc += _spread(g0, pid_b, tok, ch, mask, C, GRID, C0)
    if C1 > 0:
        acc += _spread(g1, pid_b, tok, ch, mask, C, GRID, C1)
    if C2 > 0:
        acc += _spread(g2, pid_b, tok, ch, mask, C, GRID, C2)
    if C3 > 0:
        acc += _spread(g3, pid_b, tok, ch, mask, C, GRID, C3)
    out = out_ptr + pid_b * (T * C) + tok[:, None] * C + ch[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- launchers --


def _groups(items: list) -> list[list]:
    return [items[i : i + MAX_CELLS_PER_LAUNCH] for i in range(0, len(items), MAX_CELLS_PER_LAUNCH)]


def _slots(values: list, fill):
    return list(values) + [fill] * (MAX_CELLS_PER_LAUNCH - len(values))


def _region_block(regions: int) -> int:
    """Regions per tl.dot: a power of two, at least 16 (tl.dot's minimum), at most
    ``_MAX_REGION_BLOCK``, so the one-hot matrix ``P`` stays within 64 x 256 entries and the fp32
    accumulator within 64 x BLOCK_C."""
    return max(16, min(triton.next_power_of_2(regions), _MAX_REGION_BLOCK))


def _named(cells: list[int], blocks: list[int]) -> dict:
    """Constexpr slot arguments ``C0..C3`` (cell sizes, 0 = unused) and ``R0..R3``."""
    cells, blocks = _slots(cells, 0), _slots(blocks, 16)
    return {
        **{f"C{i}": c for i, c in enumerate(cells)},
        **{f"R{i}": r for i, r in enumerate(blocks)},
    }


def multigrain_pool(tokens: torch.Tensor, grid: int, cells: list[int]) -> list[torch.Tensor]:
    """For each cell size ``c``: ``[B, (grid // c)**2, C]``, the mean of each ``c x c`` block
    (row-major regions), accumulated in fp32 and returned in the tokens' dtype."""
    tokens = tokens.contiguous()
    b, t, ch = tokens.shape
    outs = [
        torch.empty(b, (grid // c) ** 2, ch, device=tokens.device, dtype=tokens.dtype)
        for c in cells
    ]
    if b == 0 or ch == 0:
        return outs
    t_pad = max(16, triton.next_power_of_2(t))
    one_tile = t_pad <= ONE_TILE_MAX_TOKENS
    wide = tokens.element_size() <= 2
    block_t = t_pad if one_tile else 64
    block_c = max(16, min(64 if wide else 32, triton.next_power_of_2(ch)))
    num_warps = 8 if block_t * block_c >= 8192 else 4
    for group in _groups(list(zip(cells, outs))):
        group_cells = [c for c, _ in group]
        blocks = [_region_block((grid // c) ** 2) for c in group_cells]
        _pool_fwd_kernel[(b, triton.cdiv(ch, block_c))](
            tokens,
            *_slots([o for _, o in group], group[0][1]),
            ch,
            GRID=grid,
            **_named(group_cells, blocks),
            ONE_TILE=one_tile,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
            IEEE=tokens.dtype == torch.float32,
            num_warps=num_warps,
        )
    return outs


def multigrain_pool_backward(
    grads: list[torch.Tensor], grid: int, cells: list[int]
) -> torch.Tensor:
    """Gradient w.r.t. the tokens: each block's gradient spread evenly over its ``c x c`` tokens,
    summed over granularities (in fp32, each token written once per launch)."""
    grads = [g.contiguous() for g in grads]
    b, _, ch = grads[0].shape
    dtype, device, t = grads[0].dtype, grads[0].device, grid * grid
    groups = _groups(list(zip(cells, grads)))
    # more than one launch: accumulate in fp32 and cast once at the end
    acc_dtype = dtype if len(groups) == 1 else torch.float32
    out = torch.empty(b, t, ch, device=device, dtype=acc_dtype)
    if b == 0 or ch == 0:
        return out.to(dtype)
    wide = grads[0].element_size() <= 2
    block_t = 32
    block_c = max(16, min(128 if wide else 64, triton.next_power_of_2(ch)))
    launch = (b, triton.cdiv(t, block_t), triton.cdiv(ch, block_c))
    for i, group in enumerate(groups):
        group_cells = [c for c, _ in group]
        _pool_bwd_kernel[launch](
            *_slots([g for _, g in group], group[0][1]),
            out,
            ch,
            GRID=grid,
            **{f"C{j}": c for j, c in enumerate(_slots(group_cells, 0))},
            ACCUMULATE=i > 0,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
            num_warps=4,
        )
    return out.to(dtype)
