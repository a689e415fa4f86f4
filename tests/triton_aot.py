"""Compile every Triton kernel ahead of time for a GPU target, without a GPU.

The interpreter proves a kernel's logic but not that it compiles: Triton's GPU compiler rejects
things the interpreter accepts (types, layouts, constexpr misuse). This script runs each op's
launcher on small CPU tensors with the kernels replaced by recorders, then compiles every
recorded launch with ``triton.compile`` for ``--arch`` (default sm_90, the H100/H200) down to a
cubin with Triton's bundled ptxas. Run it WITHOUT ``TRITON_INTERPRET`` (kernels must be real
``JITFunction``s): ``python tests/triton_aot.py [--arch 90]``. Exit code 1 on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

KERNEL_MODULES = ("region_boxes", "correspondence", "sample_pairs", "multigrain_pool",
                  "info_nce", "geometric_info_nce", "linear_soft_ce")
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                 torch.int8: "i8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
SHARED_LIMIT = 232448  # bytes of shared memory a block may use on sm_90 (227 KiB)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    return "fp32"


def compile_launch(fn, args, kwargs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, {}
    params = dict(zip(fn.arg_names, args))
    params.update({k: v for k, v in kwargs.items() if k not in OPTIONS})
    for i, name in enumerate(fn.arg_names):
        value = params[name]
        if fn.params[i].is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
        else:
            signature[name] = scalar_type(value)
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def record_launches() -> list:
    """Every kernel launch the launchers make on small inputs, over the variants that matter
    (dtypes, targets or geometry, queue, methods, metrics, cell sets)."""
    launches: list = []
    modules = {m: importlib.import_module(f"mgc_kernels.triton.{m}") for m in KERNEL_MODULES}
    for module in modules.values():
        for name, value in vars(module).items():
            if type(value).__name__ == "JITFunction" and name.endswith("kernel"):
                setattr(module, name, Recorder(value, launches))
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0, 64, 48], [8, 8, 72, 40]])
    flips = torch.tensor([True, False])
    for metric in ("mgc", "iou", "ioa"):
        modules["correspondence"].correspondence(boxes, flips, boxes, flips, 4, metric)
    modules["region_boxes"].region_boxes(boxes, flips, 4)
    for method in ("mgc", "topk"):
        modules["sample_pairs"].sample_pairs(boxes, flips, boxes, flips, 4, 3, method, 224.0,
                                             (12, 2, 8), (8, 2, 6))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tokens = torch.randn(2, 196, 40, generator=gen).to(dtype)
        pool = modules["multigrain_pool"]
        outs = pool.multigrain_pool(tokens, 14, [1, 2, 7, 14])
        pool.multigrain_pool_backward(outs, 14, [1, 2, 7, 14])
        big = torch.randn(1, 400, 8, generator=gen).to(dtype)        # grid 20: chunked path
        pool.multigrain_pool_backward(pool.multigrain_pool(big, 20, [1, 2, 4, 5]), 20,
                                      [1, 2, 4, 5])
        record_info_nce(modules, dtype, gen)
        record_linear_soft_ce(modules["linear_soft_ce"], dtype, gen)
    return launches


def record_info_nce(modules, dtype, gen):
    q, k, u = (torch.randn(n, 32, generator=gen).to(dtype) for n in (6, 5, 7))
    index = torch.randint(0, 5, (6, 2), generator=gen)
    weight = torch.rand(6, 2, generator=gen)
    lse, g = torch.zeros(6), torch.ones(6)
    nce = modules["info_nce"]
    nce.info_nce(q, k, u, index, weight, 0.1)
    nce.info_nce_backward(g, q, k, u, index, weight, lse, 0.1, torch.ones(6), True)
    regions = torch.tensor([[0.0, 0, 2, 2]]).repeat(6, 1)
    image = torch.zeros(6, dtype=torch.long)
    geo = modules["geometric_info_nce"]
    for metric in ("mgc", "iou", "ioa"):
        geo.geometric_info_nce(q, q, regions, regions, image, image, 0.1, metric)
        geo.geometric_info_nce_backward(g, q, q, regions, regions, image, image, lse, 0.1, metric)


def record_linear_soft_ce(module, dtype, gen):
    x, y = (torch.randn(6, 32, generator=gen).to(dtype) for _ in range(2))
    w, v = (torch.randn(9, 32, generator=gen).to(dtype) for _ in range(2))
    center, logits, lse = torch.zeros(9), torch.randn(6, 9, generator=gen), torch.zeros(6)
    for teacher, teacher_weight in ((y, v), (logits, None)):
        module.linear_soft_ce(x, w, teacher, teacher_weight, center, 0.1, 0.04)
        module.linear_soft_ce_backward(torch.ones(6), x, w, teacher, teacher_weight, center, lse,
                                       lse, 0.1, 0.04)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    arch = parser.parse_args().arch
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the JIT functions")
    launches = record_launches()
    seen, failures = set(), []
    for fn, args, kwargs in launches:
        key = (fn.__name__, tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a)
                                  for a in args), tuple(sorted(map(str, kwargs.items()))))
        if key in seen:
            continue
        seen.add(key)
        try:
            shared = compile_launch(fn, args, kwargs, arch).metadata.shared
        except Exception as err:  # report every kernel, not only the first failure
            failures.append(f"{fn.__name__} {kwargs}: {type(err).__name__}: {err}"[:2000])
            continue
        if shared > SHARED_LIMIT:
            failures.append(f"{fn.__name__} {kwargs}: needs {shared} bytes of shared memory")
    print(f"compiled {len(seen) - len(failures)} of {len(seen)} kernel variants for sm_{arch}")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
