"""Small helpers shared by the op tests (tests/ and tests/gpu/): tolerances, fresh leaves, a
compile check, the comparison rule for fast backends, and the multigrain_pool checks. Inputs
exact in every dtype and the tolerances of the rule come from ``benchmarks/gpu_check/rule.py``,
which the GPU check applies too."""

import pytest
import torch

import mgc_kernels as mk
from benchmarks.gpu_check.rule import grad_tol, pool_tol
from mgc_kernels import backends

TRITON_LOADS, TRITON_WHY = backends.backend_status("triton")
requires_triton = pytest.mark.skipif(not TRITON_LOADS, reason=TRITON_WHY)

FP32_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 accumulation vs fp64-exact
FP64_TOL = dict(rtol=1e-9, atol=1e-10)  # fp64 inputs are computed in fp64 (gradcheck-able)

# the dtypes Triton's interpreter computes correctly on CPU: it runs fp16 tl.dot through numpy in
# fp32, but multiplies the raw bit patterns of bf16 (bf16 is left to tests/gpu)
INTERPRETER_DTYPES = [torch.float32, torch.float16]


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf copy that requires grad."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def assert_compile_matches_eager(f, *inputs, tol=FP64_TOL):
    """``torch.compile(f, fullgraph=True)`` (aot_eager: traced, no codegen) gives the loss and
    input gradients of eager ``f``."""
    compiled_leaves, eager_leaves = [leaf(x) for x in inputs], [leaf(x) for x in inputs]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    exp = f(*eager_leaves)
    got.backward()
    exp.backward()
    torch.testing.assert_close(got, exp, **tol)
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def assert_close_to_exact(fast, reference, exact, tol):
    """Cut Cross-Entropy's rule: ``|fast - exact| <= |reference - exact| + tol`` elementwise,
    with ``exact`` computed in fp64 and ``reference`` the torch backend in the fast one's dtype."""
    fast, reference, exact = fast.double(), reference.double(), exact.double()
    excess = (fast - exact).abs() - ((reference - exact).abs() + tol)
    assert excess.max() <= 0, f"fast backend off by {excess.max().item():.3g} beyond the rule"


def assert_grads(fast, ref32, exact, dtype):
    """Gradients in ``dtype`` by the rule, with one ulp of each entry plus
    ``GRAD_SLACK * max|exact|``; ``ref32`` is the reference before its final rounding."""
    for f, r, e in zip(fast, ref32, exact):
        assert f.dtype == dtype and f.shape == e.shape
        assert torch.isfinite(f).all()
        assert_close_to_exact(f, r.to(dtype), e, grad_tol(e, dtype))


# --------------------------------------------------------------------------- multigrain_pool


def check_pool_forward(x, grid, cells, backend):
    """``multigrain_pool`` of ``backend`` against the reference by the rule; returns its outputs."""
    fast = mk.multigrain_pool(x, grid, cells, backend=backend)
    ref = mk.multigrain_pool(x, grid, cells, backend="torch")
    exact = mk.multigrain_pool(x.double(), grid, cells, backend="torch")
    for f, r, e, c in zip(fast, ref, exact, cells):
        assert f.dtype == x.dtype and f.shape == r.shape and f.is_contiguous()
        assert_close_to_exact(f, r, e, pool_tol(e, x.dtype))
        if c == 1:
            assert torch.equal(f, x)  # a mean of one token is the token
    return fast


def pool_token_grad(x, grid, cells, grads, backend):
    """The tokens' gradient through ``multigrain_pool`` for upstream ``grads`` (``None``: that
    output is unused, so its gradient reaches the op as None)."""
    tokens = x.detach().clone().requires_grad_(True)
    outs = mk.multigrain_pool(tokens, grid, cells, backend=backend)
    used = [i for i, g in enumerate(grads) if g is not None]
    torch.autograd.backward([outs[i] for i in used], [grads[i] for i in used])
    return tokens.grad


def check_pool_backward(x, grid, cells, grads, backend):
    """The tokens' gradient of ``backend`` against the reference by the rule."""
    fast = pool_token_grad(x, grid, cells, grads, backend)
    ref = pool_token_grad(x, grid, cells, grads, "torch")
    exact = backends.call(
        "multigrain_pool_backward",
        "torch",
        [
            torch.zeros(
                x.shape[0], (grid // c) ** 2, x.shape[2], device=x.device, dtype=torch.float64
            )
            if g is None
            else g.double()
            for g, c in zip(grads, cells)
        ],
        grid,
        cells,
    )
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert_close_to_exact(fast, ref, exact, pool_tol(exact, x.dtype))


def info_nce_op(ops, q, k, queue, index, weight, grad, temperature, grad_lse=None):
    """``(row_loss, lse, dq, dk)`` of a backend module's ``info_nce`` (``mgc_kernels.triton`` or
    ``.reference``) for row-loss gradient ``grad``, put together as the op's autograd does:
    ``dq`` from the forward's ``v``, ``dk`` from the backward."""
    from mgc_kernels.ops.info_nce import query_grad

    row_loss, lse, v = ops.info_nce(q, k, queue, index, weight, temperature)
    g = grad.to(v.dtype)
    c = None if grad_lse is None else grad_lse.to(v.dtype)
    dq = query_grad(v, g, c, index, weight, k, temperature).to(q.dtype)
    dk = ops.info_nce_backward(g, q, k, queue, index, weight, lse, temperature, grad_lse=c)
    return row_loss, lse, dq, dk


def geometric_info_nce_op(
    ops, q, k, q_regions, k_regions, q_image, k_image, grad, temperature, metric
):
    """``(row_loss, lse, rho, dq, dk)`` of a backend module's ``geometric_info_nce``, as
    :func:`info_nce_op`."""
    geometry = (q_regions, k_regions, q_image, k_image)
    row_loss, lse, rho, v = ops.geometric_info_nce(q, k, *geometry, temperature, metric)
    g = grad.to(v.dtype)
    dq = (g[:, None] * v / temperature).to(q.dtype)
    dk = ops.geometric_info_nce_backward(g, q, k, *geometry, lse, rho, temperature, metric)
    return row_loss, lse, rho, dq, dk
