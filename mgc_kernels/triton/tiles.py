"""Device helpers and launch plans that more than one Triton kernel module uses.

* Region geometry (``region_boxes``, ``correspondence``, ``sample_pairs``, and ``info_nce``'s
  geometric targets): every value is computed with the reference's operations in the reference's
  order (``reference/region_boxes.py``, ``reference/correspondence.py``): cell edges
  ``(lo * (n - k) + hi * k) / n`` with a correctly rounded division, then one rounding per
  operation. The geometry kernels are launched with ``enable_fp_fusion=False`` so that no
  multiply-add is contracted into an FMA; their results are then bit-identical to the torch
  reference.
* Row tiles (``info_nce``, ``linear_soft_ce``): :func:`load_rows`.
* The tile plans of the InfoNCE kernels (``info_nce``, whose kernels ``geometric_info_nce``
  launches too): fixed tiles per feature width, or on CUDA Triton's autotuner over ``TUNED``;
  and the band arrays, made per group of ``BAND_R`` rows before the tiles are known.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------- region geometry


@triton.jit
def cell_edge(lo, hi, k, n):
    """Edge ``k`` of ``n`` equal cells from ``lo`` to ``hi`` (fp32)."""
    kf = k.to(tl.float32)
    return tl.math.div_rn(lo * (n - kf) + hi * kf, tl.cast(n, tl.float32))


@triton.jit
def region_corners(box_ptr, flip_ptr, image, region, n):
    """(x0, y0, x1, y1) of token-order ``region`` (row-major, flip-aware) of view ``image``."""
    base = box_ptr + image.to(tl.int64) * 4
    bx0, by0 = tl.load(base + 0).to(tl.float32), tl.load(base + 1).to(tl.float32)
    bx1, by1 = tl.load(base + 2).to(tl.float32), tl.load(base + 3).to(tl.float32)
    flipped = tl.load(flip_ptr + image) != 0
    row, col = region // n, region % n
    col = tl.where(flipped, n - 1 - col, col)  # the crop column a flipped token shows
    return (
        cell_edge(bx0, bx1, col, n),
        cell_edge(by0, by1, row, n),
        cell_edge(bx0, bx1, col + 1, n),
        cell_edge(by0, by1, row + 1, n),
    )


@triton.jit
def box_metric(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1, METRIC: tl.constexpr):
    """``"mgc"``: |a&b| / (|a|+|b|); ``"iou"``; ``"ioa"``: |a&b| / |a|, for boxes that broadcast
    against each other (``reference/correspondence.py::box_metric``, divisions correctly
    rounded)."""
    w = tl.maximum(tl.minimum(ax1, bx1) - tl.maximum(ax0, bx0), 0.0)
    h = tl.maximum(tl.minimum(ay1, by1) - tl.maximum(ay0, by0), 0.0)
    inter = w * h
    area_a = (ax1 - ax0) * (ay1 - ay0)
    if METRIC == "ioa":
        return tl.math.div_rn(inter, tl.broadcast_to(area_a, inter.shape))
    areas = area_a + (bx1 - bx0) * (by1 - by0)
    if METRIC == "iou":
        areas = areas - inter
    return tl.math.div_rn(inter, areas)


def geometry_inputs(boxes: torch.Tensor, flips: torch.Tensor):
    """Contiguous fp32 boxes and int8 flips, as the kernels read them."""
    return boxes.float().contiguous(), flips.to(torch.int8).contiguous()


# --------------------------------------------------------------------------- row tiles


@triton.jit
def load_rows(X, idx, mask, D, offs_d):
    """``[len(idx), BLOCK_D]`` rows ``idx`` of the row-major ``[*, D]`` matrix ``X`` (0 where
    masked or past ``D``)."""
    ptrs = X + idx.to(tl.int64)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=mask[:, None] & (offs_d < D)[None, :], other=0.0)


# --------------------------------------------------------------------------- InfoNCE tile plans

# the largest tiles at D <= 128: a program's own rows, and the rows of the tiles it loops over
MAX_ROWS, MAX_COLS = 128, 64
# CUDA, 16-bit rows up to 128 wide: the (BLOCK_R, BLOCK_C, warps, stages) Triton's autotuner
# picks from once per problem (each compiles for sm_90 without spills, as
# tests/test_triton_compile.py checks), and the band groups' rows, which divide every BLOCK_R
TUNED = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2))
TUNED_BAND_R = 64


def config(rows: int, cols: int, d: int, dtype: torch.dtype) -> dict:
    """Fixed tiles for a program owning ``rows`` rows and looping over ``cols``: at most
    ``MAX_ROWS x MAX_COLS`` at D <= 128, shrunk for wider rows and for fp32 (twice the bytes, no
    tensor cores) so that the resident block stays in registers; at least 16 (``tl.dot``). The
    band's tiles (``BAND_C``) are a quarter as wide: their targets hold several more tiles live
    (at half the width the bf16 forward spills), and they are few."""
    block_d = max(16, triton.next_power_of_2(d))
    shrink = max(1, block_d // 128) * (2 if dtype == torch.float32 else 1)
    block_r = max(16, min(MAX_ROWS // shrink, triton.next_power_of_2(max(rows, 1))))
    block_c = max(16, min(MAX_COLS // shrink, triton.next_power_of_2(max(cols, 1))))
    return dict(
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BAND_R=block_r,
        BAND_C=max(16, block_c // 4),
        BLOCK_D=block_d,
        num_warps=8 if block_r * block_d >= 128 * 128 else 4,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def plan(rows: int, cols: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch's settings: :func:`config`'s fixed tiles, or on CUDA for 16-bit rows up to 128
    wide, what the autotuner leaves open (the band groups of ``TUNED_BAND_R`` rows)."""
    cfg = config(rows, cols, d, dtype)
    if not tunes(device, dtype, d):
        return cfg
    return dict(
        BAND_R=TUNED_BAND_R,
        BAND_C=cfg["BAND_C"],
        BLOCK_D=cfg["BLOCK_D"],
        PRECISION=cfg["PRECISION"],
    )


def tunes(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and d <= 128


@functools.cache
def autotuned(kernel, configs: tuple, key: tuple):
    """``kernel`` under Triton's autotuner over ``configs`` (``(BLOCK_R, BLOCK_C, warps,
    stages)``), tuned once per ``key`` arguments and dtypes."""
    return triton.autotune(
        [
            triton.Config(dict(BLOCK_R=r, BLOCK_C=c), num_warps=w, num_stages=s)
            for r, c, w, s in configs
        ],
        key=list(key),
    )(kernel)


def launch(kernel, key: tuple, cfg: dict, rows: int, *args, **flags):
    """``kernel`` over blocks of ``rows`` with ``cfg`` from :func:`plan`."""
    if "BLOCK_R" in cfg:
        kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](*args, **flags, **cfg)
    else:
        autotuned(kernel, TUNED, key)[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
            *args, **flags, **cfg
        )


def tile_band(lo: torch.Tensor, hi: torch.Tensor, tile: int, limit: int) -> torch.Tensor:
    """``[groups, 2]`` int32: each group's ``[lo, hi)`` widened to whole band tiles of ``tile``
    rows (capped at ``limit``), ``[limit, 0)`` where ``hi <= lo`` (no targets: neutral for the
    kernels' union over a block's groups), and one more empty group where the count is odd (a
    block spans at most two). The hot loops around the band start and stop where it does, at any
    row."""
    empty = hi <= lo
    lo = torch.div(lo, tile, rounding_mode="floor") * tile
    hi = torch.clamp(-torch.div(-hi, tile, rounding_mode="floor") * tile, max=limit)
    band = torch.stack([torch.where(empty, limit, lo), torch.where(empty, 0, hi)], 1)
    if len(band) % 2:
        band = torch.cat([band, band.new_tensor([[limit, 0]])])
    return band.to(torch.int32).contiguous()


def forward_plan(q, k, queue=None) -> dict:
    """The forward kernel's settings: a program per block of ``q``'s rows, over ``k`` and
    ``queue``."""
    cols = len(k) + (0 if queue is None else len(queue))
    return plan(len(q), cols, q.shape[1], q.dtype, q.device)


def dk_plan(q, k) -> dict:
    """The dk kernel's settings: a program per block of ``k``'s rows, over ``q``."""
    return plan(len(k), len(q), q.shape[1], q.dtype, q.device)
