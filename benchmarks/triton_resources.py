"""What a compiled Triton kernel uses of a GPU, and whether it can launch there.

:func:`kernel_resources` turns a compiled kernel into ``{regs, spill_bytes, shared_bytes,
num_warps, num_stages, ...}``. It takes ``triton.compile``'s result and the kernels a
``JITFunction`` compiled at run time alike: both are ``triton.compiler.CompiledKernel`` (Triton
3.6 to 3.8 at least; :func:`jit_kernels` lists a ``JITFunction``'s). :func:`launch_problems`
says why a kernel cannot launch on a device (:data:`SM90`, the H100/H200, by default).

Where each figure comes from:

- ``shared_bytes``, ``num_warps``, ``num_stages``: the compiler's metadata
  (``compiled.metadata.shared`` is the dynamic shared memory the launcher requests per block;
  ``num_warps`` is the total after warp specialisation).
- ``regs`` and ``spill_bytes`` once the kernel is loaded on a device: ``compiled.n_regs`` and
  ``compiled.n_spills``, which ``CompiledKernel._init_handles`` fills from the driver
  (``CU_FUNC_ATTRIBUTE_NUM_REGS`` and ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4``), so
  ``spill_bytes = 4 * n_spills`` is the local memory per thread. They exist only after a first
  launch (or ``compiled.run``) on a GPU.
- Without a GPU (or before loading): the cubin that Triton's bundled ``ptxas`` produced
  (``compiled.asm["cubin"]``), read with Triton's bundled ``cuobjdump --dump-resource-usage``
  (``triton/backends/nvidia/bin``, in every Triton wheel; ``TRITON_CUOBJDUMP_PATH`` overrides):
  ``REG`` is the register count the driver reports, and ``STACK + LOCAL`` the local memory per
  thread that the driver reports as ``LOCAL_SIZE_BYTES``. Triton kernels declare no local
  arrays and make no calls, so that local memory is the register spill area; 0 means no spill.
- ``loops`` (from the cubin, always): the kernel's loops in its SASS (``cuobjdump -sass``), each
  a backward branch and the instructions it jumps over: ``instructions`` is what one thread
  executes per iteration, i.e. per tile of a tiled loop, ``mma`` how many of them are
  tensor-core instructions (``HGMMA``/``HMMA``), ``spill`` how many touch local memory.
  (ptxas's own ``-v`` report, with its spill store/load byte counts, is written to a temporary
  file that Triton deletes unless ``TRITON_DUMP_PTXAS_LOG=1``, and a kernel read back from the
  cache has none, so it is not used.) ``source`` says which of the two was read.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any, NamedTuple


class Limits(NamedTuple):
    """Per-block launch limits of a GPU architecture (CUDA programming guide, compute
    capabilities table)."""

    name: str
    shared_per_block: int  # opt-in maximum of dynamic shared memory per block, bytes
    registers_per_block: int  # 32-bit registers one block may hold (= per SM on sm_90)
    registers_per_thread: int
    threads_per_block: int
    register_unit: int = 256  # registers are allocated per warp in units of this many
    warp_size: int = 32


SM90 = Limits(
    "sm_90",
    shared_per_block=232448,
    registers_per_block=65536,
    registers_per_thread=255,
    threads_per_block=1024,
)

_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump flag`` on ``cubin`` with Triton's bundled tool (no GPU needed)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run(
            [knobs.nvidia.cuobjdump.path, flag, path], check=True, capture_output=True, text=True
        ).stdout


def sass_loops(sass: str) -> list[dict]:
    """``[{instructions, mma, spill}]`` of each loop in ``sass``, innermost first: a loop is a
    branch to an earlier address, and its body the instructions from that address to the
    branch (an outer loop's count includes its inner loops')."""
    lines = [(int(addr, 16), op, rest) for addr, _, op, rest in _SASS.findall(sass)]
    loops = []
    for end, (addr, op, rest) in enumerate(lines):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in lines[: end + 1] if a >= int(target.group(1), 16)]
            loops.append(
                dict(
                    instructions=len(body),
                    mma=sum(o.startswith(("HGMMA", "HMMA")) for o in body),
                    spill=sum(o.startswith(("LDL", "STL")) for o in body),
                )
            )
    return sorted(loops, key=lambda loop: loop["instructions"])


def cubin_resources(cubin: bytes) -> dict:
    """``{regs, spill_bytes, static_shared_bytes}`` of the one kernel in ``cubin``, from
    ``cuobjdump --dump-resource-usage`` (no GPU needed)."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    found = _USAGE.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel's resource usage from cuobjdump, got:\n{out}")
    regs, stack, shared, local = map(int, found[0])
    return dict(regs=regs, spill_bytes=stack + local, static_shared_bytes=shared)


def kernel_resources(compiled) -> dict:
    """``{regs, spill_bytes, shared_bytes, num_warps, num_stages, threads, source, loops}`` of a
    compiled kernel: ``triton.compile``'s result or a kernel from a ``JITFunction``'s cache
    (see the module docstring for where each figure comes from)."""
    meta = compiled.metadata
    out: dict[str, Any] = dict(
        shared_bytes=int(meta.shared),
        num_warps=int(meta.num_warps),
        num_stages=int(meta.num_stages),
    )
    out["threads"] = out["num_warps"] * int(getattr(meta, "warp_size", 32) or 32)
    if getattr(compiled, "n_regs", None) is not None:  # loaded on a device
        out.update(
            regs=int(compiled.n_regs), spill_bytes=4 * int(compiled.n_spills), source="driver"
        )
    else:
        usage = cubin_resources(compiled.asm["cubin"])
        out.update(regs=usage["regs"], spill_bytes=usage["spill_bytes"], source="cuobjdump")
    out["loops"] = sass_loops(cuobjdump(compiled.asm["cubin"], "-sass"))
    return out


def allocated_registers(regs: int, threads: int, limits: Limits = SM90) -> int:
    """Registers a block of ``threads`` threads occupies: each warp gets ``regs * 32`` rounded
    up to the allocation unit (256 registers on sm_5x to sm_90)."""
    warps = -(-threads // limits.warp_size)
    per_warp = -(-regs * limits.warp_size // limits.register_unit) * limits.register_unit
    return warps * per_warp


def launch_problems(resources: dict, limits: Limits = SM90) -> list[str]:
    """Why a kernel with these resources cannot launch on ``limits`` (empty: it can)."""
    problems = []
    if resources["shared_bytes"] > limits.shared_per_block:
        problems.append(
            f"needs {resources['shared_bytes']} bytes of shared memory per block, "
            f"{limits.name} allows {limits.shared_per_block}"
        )
    if resources["threads"] > limits.threads_per_block:
        problems.append(
            f"{resources['threads']} threads per block, {limits.name} allows "
            f"{limits.threads_per_block}"
        )
    if resources["regs"] > limits.registers_per_thread:
        problems.append(
            f"{resources['regs']} registers per thread, {limits.name} allows "
            f"{limits.registers_per_thread}"
        )
    held = allocated_registers(resources["regs"], resources["threads"], limits)
    if held > limits.registers_per_block:
        problems.append(
            f"{resources['regs']} registers x {resources['threads']} threads "
            f"occupy {held} registers, {limits.name} has {limits.registers_per_block}"
        )
    return problems


def jit_kernels(jit_function) -> Iterator[tuple[Any, Any]]:
    """``(device, CompiledKernel)`` for every kernel a ``JITFunction`` has compiled in this
    process (its per-device caches; entries still compiling asynchronously are skipped)."""
    for device, cache in getattr(jit_function, "device_caches", {}).items():
        for kernel in cache[0].values():
            if hasattr(kernel, "metadata") and hasattr(kernel, "asm"):
                yield device, kernel
