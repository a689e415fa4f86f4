"""Small helpers shared by the op tests: tolerances, fresh leaves, a compile check, and the
comparison rule for fast backends."""
import pytest
import torch

from mgc_kernels import backends

TRITON_LOADS, TRITON_WHY = backends.backend_status("triton")
requires_triton = pytest.mark.skipif(not TRITON_LOADS, reason=TRITON_WHY)

FP32_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 accumulation vs fp64-exact
FP64_TOL = dict(rtol=1e-9, atol=1e-10)  # fp64 inputs are computed in fp64 (gradcheck-able)


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
