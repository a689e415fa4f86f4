"""Phase f: the compiled resources of every Triton kernel variant that ran in this check.

The check points ``TRITON_CACHE_DIR`` at a fresh folder, so Triton's on-disk cache holds exactly
the variants that the other phases' processes (pytest's workers too) compiled. Each variant there
is a metadata file (name, warps, stages, dynamic shared memory) beside its cubin, whose registers
and spills :func:`benchmarks.triton_resources.cubin_resources` reads without a device.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..triton_resources import cubin_resources, cuobjdump, launch_problems, sass_loops


def variants(cache: Path) -> Iterator[dict]:
    """One record per compiled kernel in the Triton cache folder ``cache``."""
    for meta_path in sorted(cache.glob("*/*.json")):
        if meta_path.name.startswith("__grp__"):
            continue
        meta = json.loads(meta_path.read_text())
        cubin = meta_path.with_suffix(".cubin")
        if "name" not in meta or not cubin.exists():
            continue
        record = {
            "kernel": meta["name"],
            "arch": meta.get("target", {}).get("arch"),
            "num_warps": meta["num_warps"],
            "num_stages": meta["num_stages"],
            "shared_bytes": meta["shared"],
            "threads": meta["num_warps"] * 32,
            "hash": meta_path.parent.name[:12],
        }
        try:
            usage = cubin_resources(cubin.read_bytes())
            record.update(
                regs=usage["regs"],
                spill_bytes=usage["spill_bytes"],
                loops=sass_loops(cuobjdump(cubin.read_bytes(), "-sass")),
            )
            record["launch_problems"] = launch_problems(record)
        except Exception as err:  # a record, whatever cuobjdump says
            record["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        yield record
