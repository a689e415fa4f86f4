"""The ``torch_attention`` benchmark provider (benchmarks/attention_baseline.py) computes the
library's loss and gradients (dq, dk) from PyTorch's fused attention kernels: checked against
the torch reference with autograd on CPU, fp32 and fp64, through the cases it is wired into and
on direct inputs (rows without overlap, a width that needs padding); and it skips cleanly where
no kernel runs."""

import math

import pytest
import torch

import mgc_kernels as mk
from benchmarks import attention_baseline, providers
from benchmarks.cases import CASES

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def loss_and_grads(fn, inputs):
    for x in inputs:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [x.grad.clone() for x in inputs]


def assert_same(fn, reference, inputs, dtype):
    loss, grads = loss_and_grads(fn, inputs)
    want_loss, want_grads = loss_and_grads(reference, inputs)
    torch.testing.assert_close(loss, want_loss, **TOLERANCE[dtype])
    for grad, want in zip(grads, want_grads):
        torch.testing.assert_close(grad, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["geometric_info_nce", "info_nce_queue"])
def test_provider_matches_the_op(name, dtype):
    """Through the benchmark's own wiring: the case's inputs, the provider's step."""
    case = CASES[name]
    problem = case.build(**case.quick_sizes[0], dtype=dtype, device=CPU)
    for x in problem.grad_inputs:
        x.requires_grad_(True)
    step = providers.make("torch_attention", case, problem, CPU)
    assert callable(step), step
    assert_same(step, lambda: problem.op("torch"), problem.grad_inputs, dtype)


def random_views(batch, cells, gen):
    """Region boxes ``[B, cells**2, 4]`` of two random crops of each image, far enough apart
    that some regions of view 1 overlap no region of view 2."""
    corner = torch.rand(2, batch, 2, generator=gen) * torch.tensor([0.0, 60.0])[:, None, None]
    boxes = torch.cat([corner, corner + 100 + 40 * torch.rand(2, batch, 2, generator=gen)], -1)
    flips = torch.rand(2, batch, generator=gen) < 0.5
    return [mk.region_boxes(b.round(), f, cells) for b, f in zip(boxes, flips)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_geometric_rows_without_overlap_and_odd_width(dtype):
    batch, cells, dim = 3, 4, 12  # width 12 is padded to 16, and 14 to 16 in backward
    gen = torch.Generator().manual_seed(0)
    q_boxes, k_boxes = random_views(batch, cells, gen)
    rows = batch * cells * cells
    q, k = (
        torch.randn(rows, dim, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2)
    )
    rho = attention_baseline.mgc_blocks(q_boxes, k_boxes).sum(-1)
    assert (rho == 0).any() and (rho > 0).any()
    image = torch.arange(batch).repeat_interleave(cells * cells)
    assert_same(
        lambda: attention_baseline.geometric_info_nce(q, k, q_boxes, k_boxes, 0.07),
        lambda: mk.geometric_info_nce(
            q, k, q_boxes.view(-1, 4), k_boxes.view(-1, 4), image, image, 0.07, backend="torch"
        ),
        [q, k],
        dtype,
    )


def test_queue_gets_no_gradient():
    gen = torch.Generator().manual_seed(1)
    q, k, queue = (torch.randn(n, 16, generator=gen, requires_grad=True) for n in (6, 6, 20))
    attention_baseline.info_nce_queue(q, k, queue, 0.1).backward()
    assert queue.grad is None and q.grad is not None and k.grad is not None


def test_other_cases_skip_with_a_reason():
    case = CASES["info_nce_sparse"]
    problem = case.build(**case.quick_sizes[0], dtype=torch.float32, device=CPU)
    assert (
        providers.make("torch_attention", case, problem, CPU)
        == providers.BASELINES["torch_attention"]
    )


@pytest.fixture
def fresh_kernels():
    """An empty kernel cache before and after the test, so no test sees another's choice."""
    attention_baseline.pick.cache_clear()
    yield
    attention_baseline.pick.cache_clear()


def test_skips_where_no_kernel_runs(monkeypatch, fresh_kernels):
    """A device without candidates, and a kernel that refuses the inputs, are skip reasons."""

    def refuses(*args):
        raise RuntimeError("not on this build")

    monkeypatch.setitem(attention_baseline.CANDIDATES, "cpu", {})
    assert "none exists" in attention_baseline.unavailable(CPU, torch.float32, 16)
    attention_baseline.pick.cache_clear()
    monkeypatch.setitem(
        attention_baseline.CANDIDATES,
        "cpu",
        {attention_baseline.SDPBackend.FLASH_ATTENTION: refuses},
    )
    case = CASES["geometric_info_nce"]
    problem = case.build(**case.quick_sizes[0], dtype=torch.float32, device=CPU)
    reason = providers.make("torch_attention", case, problem, CPU)
    assert isinstance(reason, str) and "not on this build" in reason


def test_a_kernel_with_base_2_lse_is_passed_over(monkeypatch, fresh_kernels):
    """Some kernels keep the LSE in base 2 internally: one returning it would be refused."""
    real = attention_baseline.CANDIDATES["cpu"][attention_baseline.SDPBackend.FLASH_ATTENTION]

    def base_2(q, k, v, scale):
        out, lse = real(q, k, v, scale)
        return out, lse / math.log(2)

    monkeypatch.setitem(
        attention_baseline.CANDIDATES,
        "cpu",
        {attention_baseline.SDPBackend.FLASH_ATTENTION: base_2},
    )
    assert "wrong output or LSE units" in attention_baseline.unavailable(CPU, torch.float32, 16)


def test_bf16_is_as_accurate_as_the_op():
    """The 16-bit path (fp32 LSE and sums, the LSE bias carried in bf16 columns) is as close to
    the fp64 result as the library's own bf16 result is, within a fifth."""
    case = CASES["geometric_info_nce"]
    results = {}
    for name, dtype in [
        ("truth", torch.float64),
        ("op", torch.bfloat16),
        ("attention", torch.bfloat16),
    ]:
        problem = case.build(**case.quick_sizes[0], dtype=dtype, device=CPU)
        for x in problem.grad_inputs:
            x.requires_grad_(True)
        step = (
            providers.make("torch_attention", case, problem, CPU)
            if name == "attention"
            else lambda problem=problem: problem.op("torch")
        )
        loss, grads = loss_and_grads(step, problem.grad_inputs)
        results[name] = [loss.double()] + [g.double() for g in grads]

    def error(name):
        return [float((x - y).norm() / y.norm()) for x, y in zip(results[name], results["truth"])]

    for ours, op in zip(error("attention"), error("op")):
        assert ours < 1.2 * op + 1e-4, (error("attention"), error("op"))
