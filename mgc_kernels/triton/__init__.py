"""Triton kernels and their launchers, one module per op (registered with ``backends``)."""
