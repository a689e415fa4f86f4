"""Inputs exact in every dtype, on the GPU. The tolerance rule (``assert_grads``) and the CPU
versions of these helpers live in tests/_helpers.py, shared with the interpreter tests."""

try:
    from .. import _helpers
    from .._helpers import assert_grads  # noqa: F401 (re-exported for the GPU tests)
except ImportError:
    import _helpers
    from _helpers import assert_grads  # noqa: F401 (re-exported for the GPU tests)


def representable(x):
    """``_helpers.representable`` (exact in bf16 and fp16), on the GPU."""
    return _helpers.representable(x).cuda()


def unit_rows(gen, n, d=128):
    """``_helpers.unit_rows`` (unit rows exact in bf16 and fp16), on the GPU."""
    return _helpers.unit_rows(gen, n, d).cuda()
