"""Inputs exact in every dtype, on the GPU: ``benchmarks/gpu_check/rule.py``'s CPU versions,
shared with the interpreter tests, moved to CUDA."""

from benchmarks.gpu_check import rule


def representable(x):
    """``rule.representable`` (exact in bf16 and fp16), on the GPU."""
    return rule.representable(x).cuda()


def unit_rows(gen, n, d=128):
    """``rule.unit_rows`` (unit rows exact in bf16 and fp16), on the GPU."""
    return rule.unit_rows(gen, n, d).cuda()
