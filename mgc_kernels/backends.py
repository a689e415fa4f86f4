"""Which implementation of an op runs: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"native"``.

Every op has a plain-PyTorch reference (``torch``); each op's module in ``ops/`` registers it
here, and its Triton and native kernels the same way (by name, imported on first use). ``auto``
(the default, or ``MGC_KERNELS_BACKEND``) picks, for CUDA tensors, Triton when it imports and has
the op, else the reference, warning once when a CUDA tensor falls back to the slower reference;
for CPU tensors, the native C++ kernels when the op has them and the extension loads without
compiling (built ahead of time, or an earlier build in the cache:
``python -m mgc_kernels.env --build-native``), else the reference.
A backend asked for by name that cannot run raises a ``RuntimeError`` that says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from . import _checks, native

BACKENDS = ("auto", "torch", "triton", "native")
ENV_VAR = "MGC_KERNELS_BACKEND"

_IMPLS: dict[tuple[str, str], Callable | str] = {}
_warned_fallback: set[str] = set()


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` for ``backend``."""
    _checks.choice("backend", backend, BACKENDS[1:])

    def wrap(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return wrap


def register_lazy(op: str, backend: str, target: str) -> None:
    """``op`` for ``backend`` is ``"module:function"``, imported on first use (so that importing
    the library never imports Triton)."""
    register(op, backend)(target)


def registered_ops() -> list[str]:
    """Names of the public ops (backward ops run where their forward op was resolved)."""
    return sorted({op for op, _ in _IMPLS if not op.endswith("_backward")})


def implementation(op: str, backend: str) -> Callable:
    """The registered function for a resolved (concrete) backend."""
    impl = _IMPLS[(op, backend)]
    if isinstance(impl, str):
        module, name = impl.split(":")
        impl = _IMPLS[(op, backend)] = getattr(importlib.import_module(module), name)
    return impl


def call(op: str, backend: str, *args):
    """Run ``op`` on ``backend``. A Triton failure to compile or launch becomes a RuntimeError
    that names the op, the tensor shapes and dtypes, the GPU and the Triton version."""
    impl = implementation(op, backend)
    if backend != "triton":
        return impl(*args)
    try:
        return impl(*args)
    except Exception as err:
        if not type(err).__module__.startswith("triton"):
            raise
        tensors = ", ".join(
            f"{tuple(a.shape)} {a.dtype}".replace("torch.", "")
            for a in args
            if isinstance(a, torch.Tensor)
        )
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        gpu = (
            torch.cuda.get_device_name(device)
            if device is not None and device.type == "cuda"
            else "CPU (Triton interpreter)"
        )
        raise RuntimeError(
            f"{op}: the Triton kernel failed for inputs [{tensors}] on {gpu} with "
            f"Triton {_triton_version()[0]}: {type(err).__name__}: {err}"
        ) from err


_triton: list[tuple[str | None, str]] = []  # filled once; a plain cache that torch.compile traces


def _triton_version() -> tuple[str | None, str]:
    """Triton's version, or ``None`` and why it does not import (checked once per process)."""
    if not _triton:
        _triton.append(_import_triton())
    return _triton[0]


def _import_triton() -> tuple[str | None, str]:
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install 'mgc_kernels[triton]')"
    try:
        import triton
    except Exception as err:  # a broken install must not break the reference backend
        return None, f"triton is installed but fails to import: {type(err).__name__}: {err}"
    return triton.__version__, ""


def interpreting() -> bool:
    """Whether Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_status(backend: str, build: bool = True) -> tuple[bool, str]:
    """``(loads, why)`` for a concrete backend, independent of any op or device. ``build=False``
    leaves the native extension uncompiled when no finished build is found (``loads`` False)."""
    if backend == "torch":
        return True, f"PyTorch {torch.__version__}"
    if backend == "triton":
        version, why = _triton_version()
        if version is None:
            return False, why
        if not torch.cuda.is_available() and not interpreting():
            return False, (
                f"Triton {version} imports but there is no CUDA device; "
                "set TRITON_INTERPRET=1 before importing triton to run on CPU"
            )
        return True, f"Triton {version}"
    if backend == "native":
        return native.status(build)
    raise ValueError(
        f"backend must be one of the concrete backends {BACKENDS[1:]}, got {backend!r}"
    )


def default_backend() -> str:
    """The backend used when a call does not name one: ``MGC_KERNELS_BACKEND`` or ``auto``."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve(
    op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None
) -> str:
    """The concrete backend that runs ``op`` on ``device`` for the requested ``backend``.

    Triton kernels compute in fp32 at most: float64 inputs go to the reference under ``auto``
    and are refused by an explicit ``"triton"``."""
    requested = default_backend() if backend is None else backend
    _checks.choice("backend", requested, BACKENDS)
    if requested == "auto":
        return "torch" if dtype == torch.float64 else _auto(op, device)
    if requested == "triton" and dtype == torch.float64:
        raise RuntimeError(
            f"{op}: backend 'triton' computes in fp32 at most, got float64 inputs; "
            "use backend='torch' for float64"
        )
    loads, why = backend_status(requested)
    if not loads:
        raise RuntimeError(f"{op}: backend {requested!r} is not available: {why}")
    if (op, requested) not in _IMPLS:
        raise RuntimeError(
            f"{op}: backend {requested!r} has no implementation of this op yet; "
            f"use backend='torch' or 'auto'"
        )
    if requested == "native":
        runs, why = native.supports(device)
        if not runs:
            raise RuntimeError(f"{op}: backend 'native' cannot run on {device}: {why}")
    if requested == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{op}: backend 'triton' needs CUDA tensors, got tensors on {device} "
            "(set TRITON_INTERPRET=1 before importing triton to run on CPU)"
        )
    return requested


def auto_pick(op: str, device: torch.device) -> tuple[str, str]:
    """``(backend, fallback)``: the backend ``auto`` picks for ``op`` on ``device`` (float64
    inputs aside, which always run the reference) and, when CUDA tensors fall back to the
    reference, why (else ``""``). It never warns; :func:`resolve` warns once per op."""
    if device.type == "cpu":
        native_runs = (op, "native") in _IMPLS and native.status(build=False)[0]
        return ("native" if native_runs else "torch"), ""
    if device.type != "cuda":
        return "torch", ""
    loads, why = backend_status("triton")
    if loads and (op, "triton") in _IMPLS:
        return "triton", ""
    return "torch", why if not loads else "this op has no Triton kernel yet"


def _auto(op: str, device: torch.device) -> str:
    backend, fallback = auto_pick(op, device)
    if fallback and op not in _warned_fallback:
        _warned_fallback.add(op)
        warnings.warn(
            f"{op}: no Triton kernel can run here ({fallback}); "
            "using the slower torch reference on CUDA",
            RuntimeWarning,
            stacklevel=4,
        )
    return backend


# Settled at import, not at the first call: torch.compile traces ``auto``, but not a file probe.
native.status(build=False)
