"""Environment report: ``python -m mgc_kernels.env [--build-native]``.

Prints versions, CUDA devices, which backends load (and why not) and which backend ``auto`` picks
for each op on CPU and CUDA tensors. Paste its output into bug reports. The report never raises
and never compiles: anything that goes wrong while probing is reported in place of the value.
``--build-native`` first compiles the native extension (C++, and CUDA where a GPU and nvcc are
present) into the extension cache, once, so that ``auto`` runs the C++ kernels on CPU tensors.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable

import torch

import mgc_kernels
from mgc_kernels import backends


def _try(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a report must never crash
        return f"error: {type(e).__name__}: {e}"


def _try_rows(fn: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return [("error", f"{type(e).__name__}: {e}")]


def _table(rows: list[tuple[str, str]], indent: str = "") -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def _cuda_build() -> str:
    return torch.version.cuda or ("hip " + torch.version.hip if torch.version.hip else "cpu build")


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _devices() -> list[tuple[str, str]]:
    rows = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(
            (f"  cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
        )
    return rows


def _default_backend() -> str:
    source = f"from {backends.ENV_VAR}" if os.environ.get(backends.ENV_VAR) else "default"
    try:
        name = backends.default_backend()
    except ValueError as e:
        return f"INVALID {backends.ENV_VAR}={os.environ.get(backends.ENV_VAR)!r}: {e}"
    if name == "native" and not backends.backend_status(name, build=False)[0]:
        return f"{name} ({source}); the first call without backend= builds it"
    if name != "auto" and not backends.backend_status(name)[0]:
        return f"{name} ({source}); calls without backend= will raise: not available"
    return f"{name} ({source})"


def _backend_status(name: str) -> str:
    loads, why = backends.backend_status(name, build=False)
    return f"{'yes' if loads else 'no '}  {why}"


def _auto_picks() -> list[tuple[str, str]]:
    ops = backends.registered_ops()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    rows = [("op", "cpu     cuda")]
    for op in ops:
        picks = [_try(lambda d=d, op=op: backends.auto_pick(op, d)[0]) for d in (cpu, cuda)]
        rows.append((op, f"{picks[0]:<7} {picks[1]}"))
    return rows


def _auto_reasons() -> list[tuple[str, str]]:
    native_loads, native_why = backends.backend_status("native", build=False)
    cpu = (
        f"native where the op has C++ kernels ({native_why})"
        if native_loads
        else f"torch: the native extension is {native_why}"
        if native_why.startswith("not built")
        else f"torch: the native extension does not load ({native_why})"
    )
    triton_loads, triton_why = backends.backend_status("triton")
    cuda = (
        "triton where the op has a kernel"
        if triton_loads
        else f"torch, with a one-time warning: {triton_why}"
    )
    return [("cpu", cpu), ("cuda", cuda)]


def report() -> str:
    """The environment report as text."""
    cuda_ok = _try(lambda: str(torch.cuda.is_available()))
    rows = [
        ("mgc_kernels", _try(lambda: mgc_kernels.__version__)),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", _try(platform.platform)),
        ("torch", f"{torch.__version__} (CUDA: {_try(_cuda_build)})"),
        ("cuda available", cuda_ok),
    ]
    if cuda_ok == "True":
        rows += _try_rows(_devices)
    rows += [
        ("triton", _try(_triton_version)),
        ("default backend", _try(_default_backend)),
    ]
    lines = _table(rows)
    lines.append("backends (loads, why):")
    lines += _table(
        [(b, _try(lambda b=b: _backend_status(b))) for b in backends.BACKENDS[1:]], "  "
    )
    lines.append("auto picks:")
    lines += _table(_try_rows(_auto_picks), "  ")
    lines.append("auto, because:")
    lines += _table(_try_rows(_auto_reasons), "  ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mgc_kernels.env",
        description="mgc_kernels' environment: versions, devices, which backends load and what "
        "auto picks, and why",
    )
    parser.add_argument(
        "--build-native",
        action="store_true",
        help="compile the native extension into the extension cache first "
        "(once; then auto runs the C++ kernels on CPU tensors)",
    )
    args = parser.parse_args(argv)
    built = True
    if args.build_native:
        from mgc_kernels import native

        print(f"building the native extension from {native.CSRC} (a minute or two) ...", flush=True)
        built, why = native.build()
        print(("built: " if built else "the build failed: ") + why, flush=True)
    print(report())
    return 0 if built else 1


if __name__ == "__main__":
    sys.exit(main())
