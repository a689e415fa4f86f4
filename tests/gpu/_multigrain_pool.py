"""The multigrain_pool checks that the Triton and the native CUDA tests share: a fast backend
against the torch reference by the tolerance rule (docs/methods.md §7)
``|fast - exact| <= |reference - exact| + tol``
(``exact`` in fp64), forward and backward (``check_forward`` and ``check_backward`` come from
tests/_helpers.py, shared with the interpreter tests), determinism and int64 offsets."""

import torch

import mgc_kernels as mk
from _helpers import assert_close_to_exact
from _helpers import check_pool_backward as check_backward  # noqa: F401 (re-exported)
from _helpers import check_pool_forward as check_forward  # noqa: F401 (re-exported)
from _helpers import pool_token_grad as token_grad
from _helpers import pool_tol as tol
from mgc_kernels import backends

B, GRID, C, CELLS = 256, 14, 384, [1, 2, 7, 14]


def tokens_like(batch, grid, channels, dtype, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, grid * grid, channels, device=device, generator=gen).to(dtype)


def upstream(x, grid, cells, seed=1, unused=None):
    """One random gradient per pooled output (``None`` for the output at index ``unused``)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return [
        None
        if i == unused
        else torch.randn(
            x.shape[0], (grid // c) ** 2, x.shape[2], device=x.device, generator=gen
        ).to(x.dtype)
        for i, c in enumerate(cells)
    ]


def check_deterministic(x, backend):
    first = mk.multigrain_pool(x, GRID, CELLS, backend=backend)
    second = mk.multigrain_pool(x, GRID, CELLS, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    grads = upstream(x, GRID, CELLS)
    assert torch.equal(
        token_grad(x, GRID, CELLS, grads, backend), token_grad(x, GRID, CELLS, grads, backend)
    )


def check_int64_offsets(backend):
    """More than 2**31 token elements (bf16, about 14 GB in all): the last images are right."""
    batch, channels = 10752, 1024
    assert batch * GRID * GRID * channels > 2**31
    x = tokens_like(batch, GRID, channels, torch.bfloat16)
    outs = backends.call("multigrain_pool", backend, x, GRID, CELLS)
    grad = backends.call("multigrain_pool_backward", backend, outs, GRID, CELLS)
    for part in (slice(0, 2), slice(batch - 2, batch)):
        xs, os_ = x[part], [o[part] for o in outs]
        for o, r, e in zip(
            os_,
            backends.call("multigrain_pool", "torch", xs, GRID, CELLS),
            backends.call("multigrain_pool", "torch", xs.double(), GRID, CELLS),
        ):
            assert_close_to_exact(o, r, e, tol(e, x.dtype))
        want = backends.call("multigrain_pool_backward", "torch", os_, GRID, CELLS)
        exact = backends.call(
            "multigrain_pool_backward", "torch", [o.double() for o in os_], GRID, CELLS
        )
        assert_close_to_exact(grad[part], want, exact, tol(exact, x.dtype))
    del x, outs, grad
    torch.cuda.empty_cache()
