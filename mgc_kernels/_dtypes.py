"""The accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (so the reference stays
exact enough for float64 gradcheck)."""

import torch


def accumulate(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
