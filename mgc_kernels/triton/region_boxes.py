"""Region boxes of a pooled token grid: the corners of every region of every view, one launch
for the whole batch; bit-identical to the torch reference (the region geometry of
``triton/tiles.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import geometry_inputs, region_corners

BLOCK = 256


@triton.jit(do_not_specialize=["n"])
def region_boxes_kernel(box_ptr, flip_ptr, out_ptr, n, total, BLOCK: tl.constexpr):
    item = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = item < total
    image, region = item // (n * n), item % (n * n)
    x0, y0, x1, y1 = region_corners(box_ptr, flip_ptr, tl.where(inside, image, 0), region, n)
    out = out_ptr + item * 4
    tl.store(out + 0, x0, mask=inside)
    tl.store(out + 1, y0, mask=inside)
    tl.store(out + 2, x1, mask=inside)
    tl.store(out + 3, y1, mask=inside)


def region_boxes(boxes: torch.Tensor, flips: torch.Tensor, n: int) -> torch.Tensor:
    boxes32, flips8 = geometry_inputs(boxes, flips)
    out = torch.empty(len(boxes), n * n, 4, device=boxes.device, dtype=torch.float32)
    total = out.shape[0] * out.shape[1]
    if total:
        region_boxes_kernel[(triton.cdiv(total, BLOCK),)](
            boxes32, flips8, out, n, total, BLOCK=BLOCK, enable_fp_fusion=False
        )
    return out.to(boxes.dtype)
