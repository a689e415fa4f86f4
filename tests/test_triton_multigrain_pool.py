"""The Triton multigrain_pool kernels (through Triton's interpreter on CPU) against the torch
reference by the tolerance rule (docs/methods.md §7)
``|triton - exact| <= |torch - exact| + tol`` (``exact`` in fp64):
every granularity's output and the tokens' gradient, on awkward grids, cells and channel counts,
on both forward paths (one tile per image, and the chunked path of large grids), in fp32 and fp16
(bf16 is left to tests/gpu: the interpreter multiplies its bit patterns in ``tl.dot``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk
from _helpers import (
    FP32_TOL,
    INTERPRETER_DTYPES,
    assert_compile_matches_eager,
    check_pool_backward,
    check_pool_forward,
    requires_triton,
)
from mgc_kernels import backends

GRIDS = [(14, (1, 2, 7, 14)), (6, (2, 3)), (5, (1, 5)), (4, (4,)), (12, (1, 2, 3, 4, 6, 12))]


def kernels():
    import mgc_kernels.triton.multigrain_pool as module  # imports triton: only inside tests

    return module


def forward_backward(tokens, grid, cells, backend, upstream):
    """Outputs and the tokens' gradient of ``sum(out * upstream)`` over the used cells
    (``upstream[i] is None``: output ``i`` is unused, so its gradient reaches the op as None).
    (tests/test_native.py compares its backend with this.)"""
    x = tokens.detach().clone().requires_grad_(True)
    outs = mk.multigrain_pool(x, grid, cells, backend=backend)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream) if u is not None)
    loss.backward()
    return [o.detach() for o in outs], x.grad


def compare(tokens, grid, cells, gen, unused=None):
    """Triton's outputs and tokens' gradient (for random upstream gradients in the tokens' dtype,
    none for output ``unused``) against the reference by the rule; returns the outputs."""
    upstream = [
        None
        if i == unused
        else torch.randn(tokens.shape[0], (grid // c) ** 2, tokens.shape[2], generator=gen).to(
            tokens.dtype
        )
        for i, c in enumerate(cells)
    ]
    got = check_pool_forward(tokens, grid, cells, "triton")
    assert len(got) == len(cells)
    check_pool_backward(tokens, grid, cells, upstream, "triton")
    return got


@st.composite
def problems(draw):
    grid, cells = draw(st.sampled_from(GRIDS))
    chosen = draw(st.lists(st.sampled_from(cells), min_size=1, max_size=len(cells) + 1))
    unused = draw(st.none() | st.integers(0, len(chosen) - 1)) if len(chosen) > 1 else None
    return grid, chosen, unused


@requires_triton
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@given(
    problems(),
    st.integers(1, 3),
    st.sampled_from([1, 3, 17, 70]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_matches_torch(dtype, problem, batch, channels, chunked, seed):
    """Any subset of cells (repeats, any order, more than the 4 slots of one launch), an unused
    output, batch 1..3, channel counts that are not multiples of the channel block (whose size
    depends on the dtype). Cell 1 is a copy, bit for bit (``check_pool_forward``)."""
    grid, cells, unused = problem
    module = kernels()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, grid * grid, channels, generator=gen).to(dtype)
    saved = module.ONE_TILE_MAX_TOKENS
    module.ONE_TILE_MAX_TOKENS = 16 if chunked else saved  # force the large-grid path
    try:
        compare(tokens, grid, cells, gen, unused)
    finally:
        module.ONE_TILE_MAX_TOKENS = saved


@requires_triton
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize(
    "grid, cells, channels",
    [
        (20, (1, 2, 4, 5, 10, 20), 19),  # 400 tokens: more than one tile, the chunked path for real
        (14, (2, 7), 384),  # the default shape's channel count, several channel blocks
        (14, (1, 2, 7, 14), 40),  # the default cells: copy, one-hot dot, masked sums
        (3, (1, 3), 5),  # fewer tokens than tl.dot's minimum block
        (1, (1,), 2),
    ],
)
def test_more_shapes(grid, cells, channels, dtype):
    gen = torch.Generator().manual_seed(grid)
    tokens = torch.randn(2, grid * grid, channels, generator=gen).to(dtype)
    compare(tokens, grid, list(cells), gen)


@requires_triton
def test_kernels_agree_with_known_answer():
    """Region r * n + col is the mean of its block: tokens numbered 0..T-1 give known means."""
    grid, cells = 6, [1, 2, 3, 6]
    tokens = torch.arange(36, dtype=torch.float32).reshape(1, 36, 1).repeat(1, 1, 2)
    outs = mk.multigrain_pool(tokens, grid, cells, backend="triton")
    assert torch.equal(outs[0], tokens)
    assert torch.equal(
        outs[1][0, :, 0], torch.tensor([3.5, 5.5, 7.5, 15.5, 17.5, 19.5, 27.5, 29.5, 31.5])
    )
    assert torch.equal(outs[2][0, :, 0], torch.tensor([7.0, 10.0, 25.0, 28.0]))
    assert torch.equal(outs[3][0, :, 0], torch.tensor([17.5]))


@requires_triton
def test_backward_spreads_each_block_evenly():
    tokens = torch.randn(2, 16, 3, requires_grad=True)
    outs = mk.multigrain_pool(tokens, 4, (1, 2, 4), backend="triton")
    (outs[1].sum() + 2 * outs[2].sum()).backward()  # cell 1 unused
    torch.testing.assert_close(tokens.grad, torch.full_like(tokens, 0.25 + 2 / 16), rtol=0, atol=0)


@requires_triton
def test_fp16_more_than_four_cells_accumulate_in_fp32():
    """Six cells take two backward launches; with 16-bit gradients the first launch's sums go to
    an fp32 buffer and are rounded to fp16 once, at the end. (Rounding the four-cell partial sum
    to fp16 first costs ``u`` of it, where the six-cell total may be much smaller; gradients of
    ~64 put that far above the rule's floor of 1e-5.)"""
    gen = torch.Generator().manual_seed(7)
    cells = [1, 2, 3, 4, 6, 12]
    tokens = torch.randn(2, 144, 64, generator=gen).half()
    upstream = [(64 * torch.randn(2, (12 // c) ** 2, 64, generator=gen)).half() for c in cells]
    check_pool_backward(tokens, 12, cells, upstream, "triton")


@requires_triton
def test_empty_batch_and_noncontiguous_tokens():
    outs = mk.multigrain_pool(torch.randn(0, 16, 3), 4, (1, 2), backend="triton")
    assert [tuple(o.shape) for o in outs] == [(0, 16, 3), (0, 4, 3)]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(5, 36, 2, generator=gen).transpose(0, 2)[:, :, :3]  # [2, 36, 3] strided
    compare(tokens, 6, [2, 3], gen)


@requires_triton
def test_compiles_without_graph_breaks():
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(2, (14 // c) ** 2, 5, generator=gen) for c in (1, 2, 7, 14)]

    def f(tokens):
        outs = mk.multigrain_pool(tokens, 14, (1, 2, 7, 14), backend="triton")
        return sum((o * w).sum() for o, w in zip(outs[:3], weights))  # cell 14 unused

    assert_compile_matches_eager(f, torch.randn(2, 196, 5, generator=gen), tol=FP32_TOL)


@requires_triton
def test_dispatch_and_lazy_import():
    assert backends.resolve("multigrain_pool", "triton", torch.device("cpu")) == "triton"
    code = "import sys, mgc_kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
