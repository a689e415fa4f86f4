"""The Triton multigrain_pool kernels compiled on CUDA against the torch reference, in fp32, bf16
and fp16, by DESIGN.md's rule ``|fast - exact| <= |reference - exact| + tol`` (``exact`` in fp64):
the default MGC shape (B = 256, grid 14, C = 384, cells 1, 2, 7, 14) forward and backward, eager and
under torch.compile; determinism; int64 offsets (more than 2**31 token elements); the chunked
path of large grids and awkward channel counts."""
import pytest
import torch

import mgc_kernels as mk
from mgc_kernels import backends

try:
    from .._helpers import assert_close_to_exact, requires_triton
except ImportError:
    from _helpers import assert_close_to_exact, requires_triton

pytestmark = [pytest.mark.gpu, requires_triton]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
B, GRID, C, CELLS = 256, 14, 384, [1, 2, 7, 14]


def tol(exact: torch.Tensor, dtype: torch.dtype):
    """Two units in the last place of the result's dtype (the fp32 sums of the kernel and of the
    reference differ in order, so their roundings to ``dtype`` may differ by one), plus a floor."""
    return 2 * torch.finfo(dtype).eps * exact.abs() + (2e-6 if dtype == torch.float32 else 1e-5)


def tokens_like(batch, grid, channels, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(batch, grid * grid, channels, device="cuda", generator=gen).to(dtype)


def upstream(x, grid, cells, seed=1, unused=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [None if i == unused else
            torch.randn(x.shape[0], (grid // c) ** 2, x.shape[2], device="cuda",
                        generator=gen).to(x.dtype)
            for i, c in enumerate(cells)]


def check_forward(x, grid, cells):
    fast = mk.multigrain_pool(x, grid, cells, backend="triton")
    ref = mk.multigrain_pool(x, grid, cells, backend="torch")
    exact = mk.multigrain_pool(x.double(), grid, cells, backend="torch")
    for f, r, e, c in zip(fast, ref, exact, cells):
        assert f.dtype == x.dtype and f.shape == r.shape and f.is_contiguous()
        assert_close_to_exact(f, r, e, tol(e, x.dtype))
        if c == 1:
            assert torch.equal(f, x)
    return fast


def token_grad(x, grid, cells, grads, backend):
    leaf = x.detach().clone().requires_grad_(True)
    outs = mk.multigrain_pool(leaf, grid, cells, backend=backend)
    used = [i for i, g in enumerate(grads) if g is not None]
    torch.autograd.backward([outs[i] for i in used], [grads[i] for i in used])
    return leaf.grad


def check_backward(x, grid, cells, grads):
    fast = token_grad(x, grid, cells, grads, "triton")
    ref = token_grad(x, grid, cells, grads, "torch")
    exact = backends.call("multigrain_pool_backward", "torch",
                          [torch.zeros(x.shape[0], (grid // c) ** 2, x.shape[2], device="cuda",
                                       dtype=torch.float64) if g is None else g.double()
                           for g, c in zip(grads, cells)], grid, cells)
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert_close_to_exact(fast, ref, exact, tol(exact, x.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(dtype):
    check_forward(tokens_like(B, GRID, C, dtype), GRID, CELLS)


@pytest.mark.parametrize("unused", [None, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype, unused):
    x = tokens_like(B, GRID, C, dtype)
    check_backward(x, GRID, CELLS, upstream(x, GRID, CELLS, unused=unused))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_compile_matches_eager(dtype):
    x = tokens_like(B, GRID, C, dtype)
    gen = torch.Generator(device="cuda").manual_seed(2)
    weights = [torch.randn(B, (GRID // c) ** 2, C, device="cuda", generator=gen) for c in CELLS]

    def loss(tokens):
        outs = mk.multigrain_pool(tokens, GRID, CELLS, backend="triton")
        return sum((o.float() * w).sum() for o, w in zip(outs[:3], weights))   # cell 14 unused

    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = loss(eager_x)
    got = torch.compile(loss, fullgraph=True)(compiled_x)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype):
    x = tokens_like(B, GRID, C, dtype)
    first = mk.multigrain_pool(x, GRID, CELLS, backend="triton")
    second = mk.multigrain_pool(x, GRID, CELLS, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    grads = upstream(x, GRID, CELLS)
    assert torch.equal(token_grad(x, GRID, CELLS, grads, "triton"),
                       token_grad(x, GRID, CELLS, grads, "triton"))


@pytest.mark.parametrize("grid, cells, channels", [
    (32, [1, 2, 4, 8, 16, 32], 96),   # 1024 tokens: the chunked forward; 6 cells: two launches
    (37, [1, 37], 40),                # DINOv2 at 518 px: 1369 tokens
    (16, [16, 8, 4, 2, 1], 24),       # exactly one 256-token tile, cells in reverse order
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_grids(dtype, grid, cells, channels):
    x = tokens_like(4, grid, channels, dtype)
    check_forward(x, grid, cells)
    check_backward(x, grid, cells, upstream(x, grid, cells, unused=1))


@pytest.mark.parametrize("grid, cells, channels", [
    (6, [2, 3], 70), (5, [1, 5], 17), (4, [4], 1), (14, [1, 2, 7, 14], 3), (3, [1, 3], 5),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_awkward_shapes(dtype, grid, cells, channels):
    x = tokens_like(3, grid, channels, dtype)
    check_forward(x, grid, cells)
    check_backward(x, grid, cells, upstream(x, grid, cells))


def test_int64_offsets():
    """More than 2**31 token elements (bf16, about 14 GB in all): the last images are right."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with at least 40 GiB")
    batch, channels = 10752, 1024
    assert batch * GRID * GRID * channels > 2 ** 31
    x = tokens_like(batch, GRID, channels, torch.bfloat16)
    outs = backends.call("multigrain_pool", "triton", x, GRID, CELLS)
    grad = backends.call("multigrain_pool_backward", "triton", outs, GRID, CELLS)
    for part in (slice(0, 2), slice(batch - 2, batch)):
        xs, os_ = x[part], [o[part] for o in outs]
        for o, r, e in zip(os_, backends.call("multigrain_pool", "torch", xs, GRID, CELLS),
                           backends.call("multigrain_pool", "torch", xs.double(), GRID, CELLS)):
            assert_close_to_exact(o, r, e, tol(e, x.dtype))
        want = backends.call("multigrain_pool_backward", "torch", os_, GRID, CELLS)
        exact = backends.call("multigrain_pool_backward", "torch", [o.double() for o in os_],
                              GRID, CELLS)
        assert_close_to_exact(grad[part], want, exact, tol(exact, x.dtype))
    del x, outs, grad
    torch.cuda.empty_cache()
