"""Compile every Triton kernel ahead of time for a GPU target, without a GPU, as the JIT would.

The interpreter proves a kernel's logic but not that it compiles, nor that it can launch:
Triton's GPU compiler rejects things the interpreter accepts (types, layouts, constexpr misuse),
and a kernel whose tiles need more shared memory or registers than a block may hold compiles
but fails at launch. This script runs each op's launcher with the kernels replaced by
recorders, then compiles every distinct recorded launch with ``triton.compile`` for ``--arch``
(default sm_90, the H100/H200) down to a cubin with Triton's bundled ptxas, and checks that it
fits a block of that GPU.

Which launches:

- default (``--toy``): small CPU tensors over the variants that matter (dtypes, targets or
  geometry, queue, methods, metrics, cell sets, the chunked multigrain path);
- ``--real``: the launches the launchers make at the benchmarks' headline sizes, in fp32, bf16
  and fp16 (see :func:`record_real`), on ``meta`` tensors: the launchers only read shapes,
  dtypes, strides and (for the JIT's alignment specialisation) addresses, so nothing of the
  real size is allocated. A meta tensor's ``data_ptr()`` is 0 plus its storage offset in
  bytes, which is what the JIT sees of a fresh CUDA allocation (the caching allocator hands
  out 512-byte aligned blocks): aligned base pointers, views at their true offsets. Plus the
  InfoNCE kernels with each tile config the CUDA autotuner may pick (:func:`with_tuned_tiles`).

The JIT's own specialisation: ``JITFunction.run`` binds the arguments with
``create_function_from_signature`` (integers equal to 1 become constexprs, integers and
pointers divisible by 16 get ``tt.divisibility = 16``, ``do_not_specialize`` honoured) and
``JITFunction._pack_args`` turns that into the signature, constexprs and attributes it
compiles. :func:`jit_source` calls those same functions of the installed Triton (their
``_pack_args`` differs between 3.6 and 3.8: 3.6 parses string-valued constexprs as attribute
descriptors, 3.8 gives every constexpr an empty one), with the compile target fixed instead of
read from a driver, so the compiled code is the code the JIT would run, and variants are
deduplicated by the JIT's own cache key.

Output: one JSON line per distinct variant (``kernel``, ``case``, ``dtype``, ``regs``,
``spill_bytes``, ``shared_bytes``, ``num_warps``, ``num_stages``, ``triton``, the arguments
specialised as divisible by 16 or equal to 1, ``grid`` and the other cases that launch the same
code), then a summary. ``FAILED`` and exit code 1 for any variant that does not compile, needs
more than sm_90's 232448 bytes of shared memory per block, or holds more registers than a block
may (``benchmarks/triton_resources.py``). Registers and spills come from the cubin through
Triton's bundled ``cuobjdump`` (no GPU needed).

Run it WITHOUT ``TRITON_INTERPRET`` (kernels must be real ``JITFunction``s):
``python tests/triton_aot.py [--real] [--toy] [--arch 90] [--jobs N]``. With another Triton
first on ``PYTHONPATH`` it compiles with that one (the summary names the version).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks.triton_resources, mgc_kernels from the checkout
    sys.path.insert(0, str(ROOT))

KERNEL_MODULES = (
    "region_boxes",
    "correspondence",
    "sample_pairs",
    "multigrain_pool",
    "info_nce",
    "geometric_info_nce",
    "linear_soft_ce",
)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# headline benchmark sizes (benchmarks/cases/ops.py): ViT-S/16's 14 x 14 grid, B = 256
BATCH, GRID, DIM, CHANNELS = 256, 14, 128, 384
MGC_CELLS, MGC_PAIRS = (1, 2, 7), (10, 10, 2)
QUEUE, PROTOTYPES, HEAD_DIM, TOKENS_PER_VIEW = 65536, 65536, 256, 11
SOFT_TARGETS = 10  # sparse soft targets per row (any P other than 1 or a multiple of 16)
# linear_soft_ce widths beyond DINO's 256: walked in 256-wide chunks, so all of them (any
# multiple of 16 above 256) launch the same compiled code
WIDE_HEADS = (512, 768, 1024, 2048)


class Launch(NamedTuple):
    fn: Any  # the JITFunction
    module: str
    grid: tuple
    args: tuple
    kwargs: dict
    case: str
    dtype: str


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` appends a :class:`Launch`
    labelled with its recording's current case."""

    def __init__(self, fn, module: str, recording: Recording):
        self.fn, self.module, self.recording = fn, module, recording

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = self.recording
            rec.launches.append(
                Launch(self.fn, self.module, tuple(grid), args, kwargs, rec.case, rec.dtype)
            )

        return launch


class Recording:
    """Replaces every kernel of the launcher modules by a :class:`Recorder` (the latest
    recording owns them all)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.case, self.dtype = "", ""
        self.modules = {
            m: importlib.import_module(f"mgc_kernels.triton.{m}") for m in KERNEL_MODULES
        }
        for short, module in self.modules.items():
            for name, value in list(vars(module).items()):
                fn = value.fn if isinstance(value, Recorder) else value
                if type(fn).__name__ == "JITFunction" and name.endswith("kernel"):
                    setattr(module, name, Recorder(fn, short, self))

    @contextmanager
    def labelled(self, case: str, dtype: torch.dtype | str = "fp32"):
        self.case, self.dtype = case, DTYPES.get(dtype, dtype)
        try:
            yield
        finally:
            self.case, self.dtype = "", ""

    def __getitem__(self, name: str):
        return self.modules[name]


# --------------------------------------------------------------------------- toy launches


def record_toy(rec: Recording) -> None:
    """Every kernel launch the launchers make on small inputs, over the variants that matter
    (dtypes, targets or geometry, queue, methods, metrics, cell sets)."""
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0, 64, 48], [8, 8, 72, 40]])
    flips = torch.tensor([True, False])
    with rec.labelled("toy"):
        for metric in ("mgc", "iou", "ioa"):
            rec["correspondence"].correspondence(boxes, flips, boxes, flips, 4, metric)
        rec["region_boxes"].region_boxes(boxes, flips, 4)
        for method in ("mgc", "topk"):
            rec["sample_pairs"].sample_pairs(
                boxes, flips, boxes, flips, 4, 3, method, 224.0, (12, 2, 8), (8, 2, 6)
            )
    for dtype in DTYPES:
        with rec.labelled("toy", dtype):
            tokens = torch.randn(2, 196, 40, generator=gen).to(dtype)
            pool = rec["multigrain_pool"]
            outs = pool.multigrain_pool(tokens, 14, [1, 2, 7, 14])
            pool.multigrain_pool_backward(outs, 14, [1, 2, 7, 14])
            big = torch.randn(1, 400, 8, generator=gen).to(dtype)  # grid 20: chunked path
            pool.multigrain_pool_backward(
                pool.multigrain_pool(big, 20, [1, 2, 4, 5]), 20, [1, 2, 4, 5]
            )
            toy_info_nce(rec, dtype, gen)
            toy_linear_soft_ce(rec["linear_soft_ce"], dtype, gen)


def toy_info_nce(rec, dtype, gen):
    q, k, u = (torch.randn(n, 32, generator=gen).to(dtype) for n in (6, 5, 7))
    index = torch.randint(0, 5, (6, 2), generator=gen)
    weight = torch.rand(6, 2, generator=gen)
    lse, g = torch.zeros(6), torch.ones(6)
    nce = rec["info_nce"]
    for need_v in (True, False):
        nce.info_nce(q, k, u, index, weight, 0.1, need_v)
    nce.info_nce_backward(g, q, k, u, index, weight, lse, 0.1, torch.ones(6))
    regions = torch.tensor([[0.0, 0, 2, 2]]).repeat(6, 1)
    image = torch.zeros(6, dtype=torch.long)
    geo = rec["geometric_info_nce"]
    for metric in ("mgc", "iou", "ioa"):
        geo.geometric_info_nce(q, q, regions, regions, image, image, 0.1, metric)
        geo.geometric_info_nce_backward(
            g, q, q, regions, regions, image, image, lse, g, 0.1, metric
        )


def toy_linear_soft_ce(module, dtype, gen):
    x, y = (torch.randn(6, 32, generator=gen).to(dtype) for _ in range(2))
    w, v = (torch.randn(9, 32, generator=gen).to(dtype) for _ in range(2))
    center, logits, lse = torch.zeros(9), torch.randn(6, 9, generator=gen), torch.zeros(6)
    for teacher, teacher_weight in ((y, v), (logits, None)):
        module.linear_soft_ce(x, w, teacher, teacher_weight, center, 0.1, 0.04)
        module.linear_soft_ce_backward(
            torch.ones(6), x, w, teacher, teacher_weight, center, lse, lse, 0.1, 0.04
        )


# --------------------------------------------------------------------------- real sizes


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An input of the real shape with no storage (see the module docstring)."""
    return torch.empty(shape, dtype=dtype, device="meta")


def record_real(rec: Recording) -> None:
    """The launches at the headline benchmark sizes, with the inputs the ops hand the
    launchers (``mgc_kernels/ops``: contiguous, L2-normalised embeddings in the input dtype,
    fp32 target weights, centres, gradients and lse, int64 indices, fp32 boxes, bool flips)."""
    for dtype in DTYPES:
        real_geometric_info_nce(rec, dtype)
        real_info_nce(rec, dtype)
        real_linear_soft_ce(rec, dtype, HEAD_DIM)
        real_multigrain_pool(rec, dtype)
    for width in WIDE_HEADS:
        for dtype in (torch.float32, torch.bfloat16):
            real_linear_soft_ce(rec, dtype, width)
    real_geometry(rec)


def real_geometric_info_nce(rec: Recording, dtype: torch.dtype) -> None:
    """Dense MGC (``geometric_info_nce``), B = 256, cells 1, 2, 7 (N = M = B * (14 / c)**2,
    50176 at cell 1), D = 128; forward and dk kernels. Metric ``mgc`` in every dtype,
    ``iou`` and ``ioa`` in bf16 (the metric only changes a few lines of the tile's targets; the
    fp32 variants are the slowest to compile)."""
    geo = rec["geometric_info_nce"]
    metrics = ("mgc", "iou", "ioa") if dtype == torch.bfloat16 else ("mgc",)
    for cell in MGC_CELLS:
        rows = BATCH * (GRID // cell) ** 2
        q, k = meta(rows, DIM, dtype=dtype), meta(rows, DIM, dtype=dtype)
        regions, image = meta(rows, 4), meta(rows, dtype=torch.int64)
        lse, g = meta(rows), meta(rows)
        for metric in metrics:
            with rec.labelled(
                f"geometric_info_nce B={BATCH} cell={cell} N={rows} metric={metric}", dtype
            ):
                geo.geometric_info_nce(q, k, regions, regions, image, image, 0.1, metric)
                geo.geometric_info_nce_backward(
                    g, q, k, regions, regions, image, image, lse, g, 0.1, metric
                )


def real_info_nce(rec: Recording, dtype: torch.dtype) -> None:
    """``info_nce``: MGC's sparse loss (N = M = B * 10 = 2560, hard targets P = 1 and sparse
    soft targets), the benchmark's queue case (N = M = B * 49 = 12544 against a 65536-key
    queue, P = 1) and DenseCL's ``targets="paired"`` form (the queue as ``k``, P = 0, the lse
    gradient, no dk)."""
    nce = rec["info_nce"]
    d = DIM
    sparse = BATCH * MGC_PAIRS[0]
    dense = BATCH * 49
    cases = (
        (f"info_nce sparse N=M={sparse} P=1", sparse, sparse, 0, 1, False),
        (
            f"info_nce sparse N=M={sparse} P={SOFT_TARGETS} soft",
            sparse,
            sparse,
            0,
            SOFT_TARGETS,
            False,
        ),
        (f"info_nce queue N=M={dense} Q={QUEUE} P=1", dense, dense, QUEUE, 1, False),
        (f"info_nce paired (DenseCL) N={dense} Q={QUEUE}", dense, QUEUE, 0, 0, True),
    )
    for case, n, m, queue_rows, p, paired in cases:
        q, k = meta(n, d, dtype=dtype), meta(m, d, dtype=dtype)
        queue = meta(queue_rows, d, dtype=dtype) if queue_rows else None
        index, weight = meta(n, p, dtype=torch.int64), meta(n, p)
        lse, g = meta(n), meta(n)
        with rec.labelled(case, dtype):
            nce.info_nce(q, k, queue, index, weight, 0.2)
            if not paired:  # the paired form's k is the queue: no dk
                nce.info_nce_backward(g, q, k, queue, index, weight, lse, 0.2)


def real_linear_soft_ce(rec: Recording, dtype: torch.dtype, width: int) -> None:
    """ADCLR's head loss: N = 2 * B * 11 = 5632 rows, K = 65536 prototypes, feature width
    ``width`` (256 for DINO's head), the teacher as features with prototypes and as logits."""
    module = rec["linear_soft_ce"]
    n, k = 2 * BATCH * TOKENS_PER_VIEW, PROTOTYPES
    x, w = meta(n, width, dtype=dtype), meta(k, width, dtype=dtype)
    center, lse, g = meta(k), meta(n), meta(n)
    teachers = (
        ("weights", meta(n, width, dtype=dtype), meta(k, width, dtype=dtype)),
        ("logits", meta(n, k, dtype=dtype), None),
    )
    for form, teacher, teacher_weight in teachers:
        with rec.labelled(f"linear_soft_ce N={n} D={width} K={k} teacher={form}", dtype):
            module.linear_soft_ce(x, w, teacher, teacher_weight, center, 0.1, 0.07)
            module.linear_soft_ce_backward(
                g, x, w, teacher, teacher_weight, center, lse, lse, 0.1, 0.07
            )


def real_multigrain_pool(rec: Recording, dtype: torch.dtype) -> None:
    """ViT-S tokens ``[256, 196, 384]`` pooled at cells (1, 2, 7, 14), forward and backward."""
    pool = rec["multigrain_pool"]
    cells = [1, 2, 7, 14]
    with rec.labelled(f"multigrain_pool B={BATCH} grid={GRID} C={CHANNELS} cells=1,2,7,14", dtype):
        pool.multigrain_pool(meta(BATCH, GRID * GRID, CHANNELS, dtype=dtype), GRID, cells)
        pool.multigrain_pool_backward(
            [meta(BATCH, (GRID // c) ** 2, CHANNELS, dtype=dtype) for c in cells], GRID, cells
        )


def real_geometry(rec: Recording) -> None:
    """``region_boxes``, ``correspondence`` (every metric) and ``sample_pairs`` (the released
    rule with its official strides, and top-k) at B = 256, grid 14, cells 1, 2, 7."""
    from mgc_kernels.ops.sample_pairs import EVERY_REGION, OFFICIAL_STRIDES, check_strides

    boxes, flips = meta(BATCH, 4), meta(BATCH, dtype=torch.bool)
    for cell, k in zip(MGC_CELLS, MGC_PAIRS):
        n = GRID // cell
        with rec.labelled(f"geometry B={BATCH} grid={GRID} cell={cell}"):
            rec["region_boxes"].region_boxes(boxes, flips, n)
        for metric in ("mgc", "iou", "ioa"):
            with rec.labelled(f"geometry B={BATCH} grid={GRID} cell={cell} metric={metric}"):
                rec["correspondence"].correspondence(boxes, flips, boxes, flips, n, metric)
        rule = check_strides(OFFICIAL_STRIDES.get(cell, EVERY_REGION))
        for method in ("mgc", "topk"):
            with rec.labelled(f"geometry B={BATCH} grid={GRID} cell={cell} k={k} method={method}"):
                rec["sample_pairs"].sample_pairs(
                    boxes, flips, boxes, flips, n, k, method, 224.0, rule[:3], rule[3:]
                )


# --------------------------------------------------------------------------- compiling


def target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def jit_source(fn, args: tuple, kwargs: dict, gpu_target):
    """``(cache_key, ASTSource, options, specialisation)`` exactly as ``JITFunction.run`` makes
    them for this call on ``gpu_target`` (the installed Triton's own binder and
    ``_pack_args``); ``specialisation`` names the arguments specialised as divisible by 16 or
    equal to 1."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(gpu_target)
    kwargs = dict(kwargs)
    # the first lines of JITFunction.run (Triton 3.6 and 3.8)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = jit.compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    names = [p.name for p in fn.params]
    divisible = sorted(
        names[path[0]]
        for path, values in attrs.items()
        if ["tt.divisibility", 16] in [list(v) for v in values]
    )
    equal_to_1 = sorted(
        names[path[0]]
        for path, value in constexprs.items()
        if not fn.params[path[0]].is_constexpr and value == 1
    )
    spec = {"divisible_by_16": divisible, "equal_to_1": equal_to_1}
    return key, ASTSource(fn, signature, constexprs, attrs), options.__dict__, spec


class Variant(NamedTuple):
    launch: Launch
    key: str
    spec: dict
    also: list  # other cases that launch the same compiled code


def variants(launches: list[Launch], arch: int) -> list[Variant]:
    """The distinct compiled variants among ``launches``, by the JIT's cache key."""
    found: dict[tuple, Variant] = {}
    for launch in launches:
        key, _, _, spec = jit_source(launch.fn, launch.args, launch.kwargs, target(arch))
        ident = (launch.module, launch.fn.__name__, key)
        if ident in found:
            also = found[ident].also
            label = f"{launch.case} [{launch.dtype}]"
            if (
                label != f"{found[ident].launch.case} [{found[ident].launch.dtype}]"
                and label not in also
            ):
                also.append(label)
        else:
            found[ident] = Variant(launch, key, spec, [])
    return list(found.values())


def compile_variant(variant: Variant, arch: int) -> dict:
    """The JSON row of one variant: its resources and why it cannot launch, if it cannot."""
    import triton

    from benchmarks.triton_resources import SM90, kernel_resources, launch_problems

    launch = variant.launch
    row: dict[str, Any] = dict(
        kernel=f"{launch.module}.{launch.fn.__name__}", case=launch.case, dtype=launch.dtype
    )
    try:
        _, src, options, _ = jit_source(launch.fn, launch.args, launch.kwargs, target(arch))
        start = time.perf_counter()
        compiled = triton.compile(src, target=target(arch), options=options)
        row["compile_s"] = round(time.perf_counter() - start, 1)
    except Exception as err:  # report every kernel, not only the first failure
        problems = [f"does not compile: {type(err).__name__}: {err}"[:2000]]
    else:
        try:
            row.update(kernel_resources(compiled))
        except Exception as err:
            problems = [f"resource usage unreadable: {type(err).__name__}: {err}"[:2000]]
        else:  # the limits are sm_90's: other targets are compiled but not checked
            problems = launch_problems(row, SM90) if arch == 90 else []
    row.update(
        triton=triton.__version__,
        arch=f"sm_{arch}",
        grid=list(launch.grid),
        **variant.spec,
        also=variant.also,
        can_launch=not problems,
    )
    if problems:
        row["problems"] = problems
    return row


_WORKER: dict = {}


def _worker_init(modes: tuple, arch: int, keys: list) -> None:
    found = variants(record(modes), arch)
    if [v.key for v in found] != keys:  # the parent's variants, in its order
        raise RuntimeError("a worker recorded other launches than the main process")
    _WORKER["variants"], _WORKER["arch"] = found, arch


def _worker_compile(index: int) -> dict:
    return compile_variant(_WORKER["variants"][index], _WORKER["arch"])


def record(modes: tuple) -> list[Launch]:
    rec = Recording()
    if "toy" in modes:
        record_toy(rec)
    if "real" in modes:
        record_real(rec)
        return with_tuned_tiles(rec.launches)
    return rec.launches


def with_tuned_tiles(launches: list[Launch]) -> list[Launch]:
    """``launches`` and, for each InfoNCE launch that CUDA hands to Triton's autotuner, one per
    candidate tile config (``tiles.TUNED``). The recordings run on meta tensors, which take
    the fixed-tile path; the candidates are compiled in bf16 for metric ``mgc`` (fp16 and the
    other metrics compile to the same loops)."""
    from mgc_kernels.triton import tiles

    out = list(launches)
    for launch in launches:
        if (
            launch.module in ("info_nce", "geometric_info_nce")
            and launch.dtype == "bf16"
            and launch.kwargs["BLOCK_D"] <= 128
            and "metric=i" not in launch.case
        ):
            for rows, cols, warps, stages in tiles.TUNED:
                kwargs = dict(
                    launch.kwargs,
                    BLOCK_R=rows,
                    BLOCK_C=cols,
                    BAND_R=tiles.TUNED_BAND_R,
                    num_warps=warps,
                    num_stages=stages,
                )
                out.append(
                    launch._replace(
                        kwargs=kwargs,
                        case=f"{launch.case} tuned {rows}x{cols} warps={warps} stages={stages}",
                    )
                )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument(
        "--real",
        action="store_true",
        help="the launches at the headline benchmark sizes (instead of the toy "
        "shapes, unless --toy is given too)",
    )
    parser.add_argument("--toy", action="store_true", help="the small-shape launches (default)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="compile in this many processes (default: one per CPU)",
    )
    parser.add_argument(
        "--kernel", default="", help="only the kernels whose 'module.name' contains this text"
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the JIT functions")
    import triton

    modes = tuple(m for m, on in (("toy", args.toy or not args.real), ("real", args.real)) if on)
    start = time.perf_counter()
    found = variants(record(modes), args.arch)
    chosen = [
        i for i, v in enumerate(found) if args.kernel in f"{v.launch.module}.{v.launch.fn.__name__}"
    ]
    jobs = max(1, min(args.jobs, len(chosen)))
    failures = []
    # worker processes are fresh interpreters: each records the same launches
    pool = (
        ProcessPoolExecutor(
            jobs,
            mp_context=get_context("spawn"),
            initializer=_worker_init,
            initargs=(modes, args.arch, [v.key for v in found]),
        )
        if jobs > 1
        else nullcontext()
    )
    with pool:
        rows = (
            pool.map(_worker_compile, chosen)
            if jobs > 1
            else (compile_variant(found[i], args.arch) for i in chosen)
        )
        for row in rows:
            print(json.dumps(row), flush=True)
            if not row["can_launch"]:
                failures.append(
                    f"{row['kernel']} [{row['case']}, {row['dtype']}]: "
                    + "; ".join(row["problems"])
                )
    print(
        f"compiled {len(chosen) - len(failures)} of {len(chosen)} kernel variants "
        f"({'+'.join(modes)} sizes) for sm_{args.arch} with Triton {triton.__version__} from "
        f"{Path(triton.__file__).parent} in {time.perf_counter() - start:.0f} s "
        f"({jobs} processes)"
    )
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
