"""Compiled Triton InfoNCE kernels (``info_nce`` and ``geometric_info_nce``) on CUDA against the
torch reference, by the tolerance rule (docs/methods.md §7)
``|triton - exact| <= |torch - exact| + tol``, in
fp32/bf16/fp16 at the sizes the library is for, plus int64 offsets and determinism.

The inputs are exactly representable in bf16, fp16 and fp32, so one fp64 result is exact for all
three dtypes, and one fp32 reference serves all three too (the torch backend upcasts fp16/bf16 to
fp32 and rounds dq/dk to the input dtype only at the end; ``reference_in`` does the same over row
chunks to bound memory). The tolerances, per unit roundoff ``u`` of the input dtype:

* fp32 outputs (row loss, lse, rho): both backends accumulate in fp32, the kernel over ~1200
  sequential tiles: ``2**-16 * max(1, max|exact|)`` (worst case about 7e-5 on an lse of 11).
* dq, dk: one ulp of each entry (the two backends may round to different neighbours), plus the
  rounding of the fp32 softmax tile to the input dtype for the tensor cores, at most
  ``u * max|exact|`` (``sum_j p_ij |k_j| <= max |k|``); fp16 tiles of p < 6e-5 are subnormal
  (another ``~u * max|exact|`` worst case); fp32 tiles are not rounded but summed in another order
  over ~1200 tiles (about ``1e-4 * max|exact|`` worst case).
"""

from __future__ import annotations

import functools

import pytest
import torch

import mgc_kernels as mk
from _helpers import (
    assert_close_to_exact,
    assert_grads,
    geometric_info_nce_op,
    info_nce_op,
    leaf,
)
from mgc_kernels import backends
from mgc_kernels.reference import geometric_info_nce as geometric_reference
from mgc_kernels.reference import info_nce as reference
from mgc_kernels.transforms import sample_view_boxes

from ._inputs import unit_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def kernels():
    from mgc_kernels.triton import geometric_info_nce, info_nce

    return info_nce, geometric_info_nce


def assert_outputs(fast, ref, exact):
    """fp32 per-row outputs of the forward."""
    for f, r, e in zip(fast, ref, exact):
        assert f.dtype == torch.float32 and f.shape == e.shape
        assert_close_to_exact(f, r, e, 2.0**-16 * max(1.0, e.abs().max().item()))


# --------------------------------------------------------------------------- info_nce


def reference_in(dtype, q, k, queue, index, weight, grad, temperature, rows=1024):
    """``(row_loss, lse, dq, dk)`` of the reference op in ``dtype`` (fp32: the torch backend's
    accumulation; fp64: exact), over chunks of query rows."""
    q, k, weight, grad = (x.to(dtype) for x in (q, k, weight, grad))
    queue = None if queue is None else queue.to(dtype)
    parts, dk = [], torch.zeros_like(k)
    for start in range(0, len(q), rows):
        r = slice(start, start + rows)
        row_loss, lse, dq, dk_part = info_nce_op(
            reference, q[r], k, queue, index[r], weight[r], grad[r], temperature
        )
        parts.append((row_loss, lse, dq))
        dk += dk_part
    return (*(torch.cat(p) for p in zip(*parts)), dk)


def densecl_problem(n, queue_rows, seed, temperature=0.2):
    """DenseCL's shape: row i's positive is key i, a queue of negatives; as soft targets with a
    second random key (zero-weight padding on some rows, no target on a few)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, queue = unit_rows(gen, n), unit_rows(gen, n), unit_rows(gen, queue_rows)
    index = torch.stack([torch.arange(n), torch.randint(0, n, (n,), generator=gen)], 1)
    weight = torch.tensor([0.75, 0.25]).repeat(n, 1)
    weight[::3, 1] = 0
    weight[::3, 0] = 1
    weight[7::97] = 0
    grad = 0.5 + torch.rand(n, generator=gen)
    return (q, k, queue, index.cuda(), weight.cuda(), grad.cuda(), temperature)


@pytest.fixture(scope="module")
def densecl():
    """N = 256 * 49 rows and keys, D = 128, a 65536-key queue; reference and exact results."""
    problem = densecl_problem(256 * 49, 65536, seed=0)
    return (problem, reference_in(torch.float32, *problem), reference_in(torch.float64, *problem))


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_densecl_size(densecl, dtype):
    (q, k, queue, index, weight, grad, temperature), ref, exact = densecl
    ops, _ = kernels()
    q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
    row_loss, lse, dq, dk = info_nce_op(ops, q, k, queue, index, weight, grad, temperature)
    assert_outputs((row_loss, lse), ref[:2], exact[:2])
    assert_grads((dq, dk), ref[2:], exact[2:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_awkward_sizes_no_queue(dtype):
    """Sizes that are no multiple of any tile, no queue, hard targets."""
    gen = torch.Generator().manual_seed(1)
    q, k = unit_rows(gen, 1001, 72), unit_rows(gen, 777, 72)
    index = torch.randint(0, 777, (1001, 1), generator=gen).cuda()
    weight = torch.ones(1001, 1, device="cuda")
    grad = torch.rand(1001, generator=gen).cuda()
    problem = (q, k, None, index, weight, grad, 0.07)
    ops, _ = kernels()
    qd, kd = q.to(dtype), k.to(dtype)
    row_loss, lse, dq, dk = info_nce_op(ops, qd, kd, None, index, weight, grad, 0.07)
    ref, exact = reference_in(torch.float32, *problem), reference_in(torch.float64, *problem)
    assert_outputs((row_loss, lse), ref[:2], exact[:2])
    assert_grads((dq, dk), ref[2:], exact[2:], dtype)


def test_info_nce_rows_times_keys_beyond_int32():
    """40000 rows against 40000 keys and a 60000-key queue: 4e9 logits (none is stored); a few
    rows checked against the reference run on those rows alone."""
    q, k, queue, index, weight, grad, temperature = densecl_problem(40000, 60000, seed=2)
    ops, _ = kernels()
    args = [x.to(torch.bfloat16) for x in (q, k, queue)]
    row_loss, lse, dq, dk = info_nce_op(ops, *args, index, weight, grad, temperature)
    assert torch.isfinite(dk).all()
    rows = torch.tensor([0, 1, 127, 128, 4095, 4096, 20001, 32768, 39998, 39999], device="cuda")
    picked = (q[rows], k, queue, index[rows], weight[rows], grad[rows], temperature)
    ref, exact = reference_in(torch.float32, *picked), reference_in(torch.float64, *picked)
    assert_outputs((row_loss[rows], lse[rows]), ref[:2], exact[:2])
    assert_grads((dq[rows],), ref[2:3], exact[2:3], torch.bfloat16)


def test_info_nce_queue_offsets_beyond_int32():
    """A queue of 2**24 + 3000 rows of D = 128: its element offsets pass 2**31 (int64 pointer
    arithmetic). The exact values are made over column chunks of the queue in fp64."""
    gen = torch.Generator().manual_seed(3)
    n, rows, temperature = 32, 2**24 + 3000, 0.2
    q, k = unit_rows(gen, n), unit_rows(gen, n)
    queue = torch.empty(rows, 128, device="cuda", dtype=torch.bfloat16)
    cuda_gen = torch.Generator(device="cuda").manual_seed(3)
    for start in range(0, rows, 1 << 22):  # unit rows, made in chunks (bounded memory)
        chunk = torch.randn(min(1 << 22, rows - start), 128, device="cuda", generator=cuda_gen)
        queue[start : start + len(chunk)] = torch.nn.functional.normalize(chunk, dim=1)
    assert rows * 128 > 2**31
    index, weight = torch.arange(n, device="cuda")[:, None], torch.ones(n, 1, device="cuda")
    grad = torch.ones(n, device="cuda")
    ops, _ = kernels()
    qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
    row_loss, lse, dq, dk = info_nce_op(ops, qb, kb, queue, index, weight, grad, temperature)

    q64, k64 = q.double(), k.double()
    logits_k = q64 @ k64.T / temperature
    exact_lse = torch.logsumexp(logits_k, 1)
    chunks = [slice(s, s + (1 << 20)) for s in range(0, rows, 1 << 20)]
    for c in chunks:
        exact_lse = torch.logaddexp(
            exact_lse, torch.logsumexp(q64 @ queue[c].double().T / temperature, 1)
        )
    p_k = torch.exp(logits_k - exact_lse[:, None]) - torch.eye(
        n, device="cuda", dtype=torch.float64
    )
    exact_dq = p_k @ k64
    for c in chunks:
        u = queue[c].double()
        exact_dq += torch.exp(q64 @ u.T / temperature - exact_lse[:, None]) @ u
    exact_dq /= temperature
    exact_dk = p_k.T @ q64 / temperature
    exact_loss = exact_lse - logits_k.diagonal()
    # no separate torch reference at this size: the rule with reference == exact
    assert_outputs((row_loss, lse), (exact_loss, exact_lse), (exact_loss, exact_lse))
    assert_grads((dq, dk), (exact_dq, exact_dk), (exact_dq, exact_dk), torch.bfloat16)


# --------------------------------------------------------------------------- geometric


def dense_views(batch, seed):
    """Dense MGC at c = 1: every region of every image is a row and a key, D = 128."""
    gen = torch.Generator().manual_seed(seed)
    boxes = [sample_view_boxes(480, 640, generator=gen) for _ in range(batch)]
    flips = torch.rand(2, batch, generator=gen) < 0.5
    q_regions = mk.region_boxes(torch.stack([b[0] for b in boxes]), flips[0], 14)
    k_regions = mk.region_boxes(torch.stack([b[1] for b in boxes]), flips[1], 14)
    image = torch.arange(batch).repeat_interleave(196).cuda()
    n = batch * 196
    return (
        unit_rows(gen, n),
        unit_rows(gen, n),
        q_regions.reshape(n, 4).float().cuda(),
        k_regions.reshape(n, 4).float().cuda(),
        image,
        image.clone(),
        (0.5 + torch.rand(n, generator=gen)).cuda(),
    )


@functools.cache
def geometric_case(batch, metric, temperature=0.1):
    """Inputs, reference (fp32) and exact (fp64) results, made once per (batch, metric)."""
    q, k, qr, kr, qi, ki, grad = dense_views(batch, seed=batch)
    results = []
    for dtype in (torch.float32, torch.float64):
        results.append(
            geometric_info_nce_op(
                geometric_reference,
                q.to(dtype),
                k.to(dtype),
                qr,
                kr,
                qi,
                ki,
                grad,
                temperature,
                metric,
            )
        )
    return ((q, k, qr, kr, qi, ki, grad, temperature), *results)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["mgc", "iou", "ioa"])
@pytest.mark.parametrize("batch", [8, 32])
def test_geometric_dense_mgc_size(batch, metric, dtype):
    (q, k, qr, kr, qi, ki, grad, temperature), ref, exact = geometric_case(batch, metric)
    assert (exact[2] == 0).any() and (exact[2] > 0).any()  # rows with and without overlap
    _, ops = kernels()
    q, k = q.to(dtype), k.to(dtype)
    *out, dq, dk = geometric_info_nce_op(ops, q, k, qr, kr, qi, ki, grad, temperature, metric)
    assert_outputs(out, ref[:3], exact[:3])
    assert torch.equal(out[2] > 0, exact[2] > 0)
    assert_grads((dq, dk), ref[3:], exact[3:], dtype)


# --------------------------------------------------------------------------- determinism


def test_forward_is_deterministic():
    ops, geometric = kernels()
    q, k, queue, index, weight, grad, temperature = densecl_problem(256 * 49, 65536, seed=4)
    args = [x.to(torch.bfloat16) for x in (q, k, queue)] + [index, weight, temperature]
    first, again = ops.info_nce(*args), ops.info_nce(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    q, k, qr, kr, qi, ki, grad = dense_views(32, seed=5)
    args = (q.to(torch.bfloat16), k.to(torch.bfloat16), qr, kr, qi, ki, 0.1, "mgc")
    first, again = geometric.geometric_info_nce(*args), geometric.geometric_info_nce(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # no atomics anywhere: the backward is deterministic too
    grads = [
        geometric.geometric_info_nce_backward(grad, *args[:6], first[1], first[2], 0.1, "mgc")
        for _ in range(2)
    ]
    assert torch.equal(*grads)
    problem = densecl_problem(4096, 8192, seed=4)
    args = [x.to(torch.bfloat16) for x in problem[:3]] + list(problem[3:5])
    lse = ops.info_nce(*args, 0.2)[1]
    grads = [ops.info_nce_backward(problem[5], *args, lse, 0.2) for _ in range(2)]
    assert torch.equal(*grads)


# --------------------------------------------------------------------------- public API


def test_public_ops_dispatch_to_triton_on_cuda():
    """``auto`` picks Triton for CUDA tensors; losses and gradients through the public ops obey
    the rule against backend="torch" (the exact run in fp64 goes to the reference)."""
    cuda = torch.device("cuda")
    assert backends.resolve("info_nce", "auto", cuda, torch.bfloat16) == "triton"
    assert backends.resolve("geometric_info_nce", "auto", cuda, torch.bfloat16) == "triton"
    q, k, queue, index, weight, _, _ = densecl_problem(1500, 5000, seed=6)
    row_weights = torch.rand(1500, device="cuda")

    def info(x, y, backend):
        return mk.info_nce(
            x,
            y,
            (index, weight),
            0.2,
            row_weights,
            queue.to(x.dtype),
            normalize=False,
            backend=backend,
        )

    q2, k2, qr, kr, qi, ki, _ = dense_views(8, seed=7)

    def geometric(x, y, backend):
        return mk.geometric_info_nce(x, y, qr, kr, qi, ki, normalize=False, backend=backend)

    for f, (x0, y0) in ((info, (q, k)), (geometric, (q2, k2))):
        results = []
        for dtype, backend in (
            (torch.bfloat16, "auto"),
            (torch.bfloat16, "torch"),
            (torch.float64, "auto"),
        ):
            x, y = leaf(x0, dtype), leaf(y0, dtype)
            loss = f(x, y, backend)
            loss.backward()
            results.append((loss, x.grad, y.grad))
        (fast_loss, *fast), (ref_loss, *ref), (exact_loss, *exact) = results
        assert fast_loss.dtype == torch.float32
        assert_close_to_exact(fast_loss, ref_loss, exact_loss, 2.0**-16 * exact_loss.abs())
        assert_grads(fast, [r.float() for r in ref], exact, torch.bfloat16)


def test_torch_compile_inductor_fullgraph():
    gen = torch.Generator().manual_seed(8)
    q0, k0, queue = unit_rows(gen, 300), unit_rows(gen, 200), unit_rows(gen, 1000)
    target = torch.randint(0, 200, (300,), generator=gen).cuda()

    def f(q, k):
        return mk.info_nce(q, k, target, 0.1, queue=queue, backend="triton")

    results = []
    for fn in (torch.compile(f, fullgraph=True), f):
        q, k = leaf(q0), leaf(k0)
        loss = fn(q, k)
        loss.backward()
        results.append((loss, q.grad, k.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
