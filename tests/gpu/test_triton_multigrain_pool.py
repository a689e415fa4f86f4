"""The Triton multigrain_pool kernels compiled on CUDA against the torch reference, in fp32, bf16
and fp16, by the tolerance rule (docs/methods.md §7)
``|fast - exact| <= |reference - exact| + tol`` (``exact`` in fp64):
the default MGC shape (B = 256, grid 14, C = 384, cells 1, 2, 7, 14) forward and backward, eager and
under torch.compile; determinism; int64 offsets (more than 2**31 token elements); the chunked
path of large grids and awkward channel counts."""

import pytest
import torch

import mgc_kernels as mk
from _helpers import requires_triton

from ._multigrain_pool import (
    CELLS,
    GRID,
    B,
    C,
    check_backward,
    check_deterministic,
    check_forward,
    check_int64_offsets,
    tokens_like,
    upstream,
)

pytestmark = [pytest.mark.gpu, requires_triton]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(dtype):
    check_forward(tokens_like(B, GRID, C, dtype), GRID, CELLS, "triton")


@pytest.mark.parametrize("unused", [None, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype, unused):
    x = tokens_like(B, GRID, C, dtype)
    check_backward(x, GRID, CELLS, upstream(x, GRID, CELLS, unused=unused), "triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_compile_matches_eager(dtype):
    x = tokens_like(B, GRID, C, dtype)
    gen = torch.Generator(device="cuda").manual_seed(2)
    weights = [torch.randn(B, (GRID // c) ** 2, C, device="cuda", generator=gen) for c in CELLS]

    def loss(tokens):
        outs = mk.multigrain_pool(tokens, GRID, CELLS, backend="triton")
        return sum((o.float() * w).sum() for o, w in zip(outs[:3], weights))  # cell 14 unused

    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = loss(eager_x)
    got = torch.compile(loss, fullgraph=True)(compiled_x)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype):
    check_deterministic(tokens_like(B, GRID, C, dtype), "triton")


@pytest.mark.parametrize(
    "grid, cells, channels",
    [
        (32, [1, 2, 4, 8, 16, 32], 96),  # 1024 tokens: the chunked forward; 6 cells: two launches
        (37, [1, 37], 40),  # DINOv2 at 518 px: 1369 tokens
        (16, [16, 8, 4, 2, 1], 24),  # exactly one 256-token tile, cells in reverse order
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_grids(dtype, grid, cells, channels):
    x = tokens_like(4, grid, channels, dtype)
    check_forward(x, grid, cells, "triton")
    check_backward(x, grid, cells, upstream(x, grid, cells, unused=1), "triton")


@pytest.mark.parametrize(
    "grid, cells, channels",
    [
        (6, [2, 3], 70),
        (5, [1, 5], 17),
        (4, [4], 1),
        (14, [1, 2, 7, 14], 3),
        (3, [1, 3], 5),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_awkward_shapes(dtype, grid, cells, channels):
    x = tokens_like(3, grid, channels, dtype)
    check_forward(x, grid, cells, "triton")
    check_backward(x, grid, cells, upstream(x, grid, cells), "triton")


def test_int64_offsets():
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB")
    check_int64_offsets("triton")
