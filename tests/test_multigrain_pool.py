"""multigrain_pool against explicit block loops; gradients; dtypes; bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgc_kernels as mk


def block_means(tokens, grid, cell):
    """Region r*n + c is the mean of tokens (cell*r + i) * grid + cell*c + j over the block."""
    n = grid // cell
    b, _, ch = tokens.shape
    out = torch.empty(b, n * n, ch, dtype=torch.float64)
    for r in range(n):
        for c in range(n):
            idx = [(cell * r + i) * grid + cell * c + j for i in range(cell) for j in range(cell)]
            out[:, r * n + c] = tokens[:, idx].double().mean(1)
    return out


GRIDS = st.sampled_from([(14, (1, 2, 7, 14)), (6, (1, 2, 3, 6)), (5, (1, 5)), (4, (2,))])


@given(GRIDS, st.integers(1, 3), st.integers(1, 5), st.randoms(use_true_random=False))
def test_matches_block_loops(grid_cells, batch, channels, rnd):
    grid, cells = grid_cells
    gen = torch.Generator().manual_seed(rnd.randint(0, 2**31))
    tokens = torch.randn(batch, grid * grid, channels, generator=gen, dtype=torch.float64)
    for out, cell in zip(mk.multigrain_pool(tokens, grid, cells), cells):
        assert torch.allclose(out, block_means(tokens, grid, cell))


def test_gradcheck():
    tokens = torch.randn(2, 36, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mk.multigrain_pool(t, 6, (1, 2, 3, 6)), (tokens,))


def test_unused_granularity_gets_no_gradient_trouble():
    tokens = torch.randn(2, 16, 3, dtype=torch.float64, requires_grad=True)
    out = mk.multigrain_pool(tokens, 4, (1, 2, 4))
    out[1].sum().backward()  # only cell 2 used
    assert torch.allclose(tokens.grad, torch.full_like(tokens, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype(dtype):
    tokens = torch.randn(2, 196, 8, dtype=torch.float64)
    outs = mk.multigrain_pool(tokens.to(dtype).requires_grad_(), 14, (1, 2, 7))
    for out, cell in zip(outs, (1, 2, 7)):
        assert out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out.double(), block_means(tokens.to(dtype), 14, cell), atol=tol)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(tokens=torch.randn(2, 195, 4)), "tokens"),
        (dict(tokens=torch.randn(196, 4)), "tokens"),
        (dict(tokens=torch.randint(0, 5, (2, 196, 4))), "tokens"),
        (dict(cells=(1, 3)), "cell must divide grid"),
        (dict(cells=()), "cells"),
        (dict(cells=2), "cells"),
        (dict(grid=0), "grid"),
    ],
)
def test_bad_input(bad, match):
    args = dict(tokens=torch.randn(2, 196, 4), grid=14, cells=(1, 2))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        mk.multigrain_pool(args["tokens"], args["grid"], args["cells"])
