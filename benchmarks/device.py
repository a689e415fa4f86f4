"""Device names, file-name slugs and published peak throughput.

Peaks are the vendor's dense (no sparsity) figures. Matmul peaks are for bf16/fp16 tensor cores
only: fp32 matmuls may run as TF32 or on CUDA cores depending on the implementation, so no
single fp32 peak is fair and fp32 rows get no matmul fraction. A device not listed here gets no
fraction at all rather than a guessed one.
"""

from __future__ import annotations

import os
import platform
import re
from typing import NamedTuple

import torch


class Target(NamedTuple):
    """The device the benchmarks run on and the name its rows carry."""

    device: torch.device
    name: str

    @property
    def threads(self) -> int | None:
        """CPU threads torch uses (CPU timings depend on it); ``None`` on CUDA."""
        return torch.get_num_threads() if self.device.type == "cpu" else None


def target(device: torch.device) -> Target:
    return Target(device, name(device))


class Peak(NamedTuple):
    matmul_tflops: float  # bf16/fp16 dense tensor-core TFLOP/s
    memory_gbps: float  # HBM bandwidth, GB/s (1e9 bytes)


# (pattern searched in torch.cuda.get_device_name, peak); first match wins.
PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"H100 80GB HBM3$", Peak(989.4, 3350.0)),  # H100 SXM5
    (r"H100 PCIe$", Peak(756.0, 2000.0)),
    (r"H200$", Peak(989.4, 4800.0)),  # H200 SXM
    (r"A100-SXM4-80GB$", Peak(312.0, 2039.0)),
)

HALF_DTYPES = (torch.bfloat16, torch.float16)


def name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for CUDA, else ``"cpu <model> x<cores>"`` (the cores the
    process may use)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu {_cpu_model()} x{cores}"


def _cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def slug(device_name: str) -> str:
    """A file-name-safe device name: ``"NVIDIA H100 80GB HBM3"`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def peak(device_name: str) -> Peak | None:
    for pattern, value in PEAKS:
        if re.search(pattern, device_name):
            return value
    return None


def matmul_fraction(tflops: float | None, device_name: str, dtype: torch.dtype) -> float | None:
    """Achieved / peak tensor-core TFLOP/s, or ``None`` (unknown device, fp32, no figure)."""
    known = peak(device_name)
    if tflops is None or known is None or dtype not in HALF_DTYPES:
        return None
    return tflops / known.matmul_tflops


def memory_fraction(gbps: float | None, device_name: str) -> float | None:
    """Achieved / peak memory bandwidth, or ``None`` (unknown device, no figure)."""
    known = peak(device_name)
    if gbps is None or known is None:
        return None
    return gbps / known.memory_gbps
