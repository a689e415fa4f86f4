"""Overlap weights between every region of one view and every region of the other, one launch
for the whole batch; bit-identical to the torch reference (see triton/tiles.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import box_metric, geometry_inputs, region_corners

BLOCK = 32


@triton.jit(do_not_specialize=["n"])
def correspondence_kernel(
    box1_ptr, flip1_ptr, box2_ptr, flip2_ptr, out_ptr, n, METRIC: tl.constexpr, BLOCK: tl.constexpr
):
    image = tl.program_id(0)
    regions = n * n
    r1 = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[:, None]
    r2 = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)[None, :]
    a = region_corners(box1_ptr, flip1_ptr, image, tl.minimum(r1, regions - 1), n)
    b = region_corners(box2_ptr, flip2_ptr, image, tl.minimum(r2, regions - 1), n)
    w = box_metric(*a, *b, METRIC)
    out = out_ptr + image.to(tl.int64) * regions * regions + r1 * regions + r2
    tl.store(out, w, mask=(r1 < regions) & (r2 < regions))


def correspondence(boxes1, flips1, boxes2, flips2, n: int, metric: str) -> torch.Tensor:
    b1, f1 = geometry_inputs(boxes1, flips1)
    b2, f2 = geometry_inputs(boxes2, flips2)
    regions = n * n
    out = torch.empty(len(b1), regions, regions, device=b1.device, dtype=torch.float32)
    if out.numel():
        grid = (len(b1), triton.cdiv(regions, BLOCK), triton.cdiv(regions, BLOCK))
        correspondence_kernel[grid](
            b1, f1, b2, f2, out, n, METRIC=metric, BLOCK=BLOCK, enable_fp_fusion=False
        )
    return out.to(boxes1.dtype)
