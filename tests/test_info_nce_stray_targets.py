"""Out-of-range target indices where the host-side range check does not run (value checks off,
or under torch.compile): no backend may crash, read or write outside ``k``, or return a silently
wrong loss. The rows with such a target get a NaN loss; every other row is untouched."""

import pytest
import torch

import mgc_kernels as mk
from _helpers import leaf, requires_triton

N, M, QUEUE, D = 6, 5, 4, 16
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
# an index past the keys, one into the queue's range, a negative one, one past int32
STRAY = {1: M, 2: M + 1, 3: -1, 5: 2**40}


@pytest.fixture
def no_value_checks():
    mk.set_value_checks(False)
    yield
    mk.set_value_checks(True)


def problem():
    gen = torch.Generator().manual_seed(0)
    q, queue = torch.randn(N, D, generator=gen), torch.randn(QUEUE, D, generator=gen)
    # k lives between two guard rows of one buffer: nothing may read them into the loss
    buffer = torch.randn(M + 2, D, generator=gen)
    index = torch.stack([torch.arange(N) % M, torch.randint(0, M, (N,), generator=gen)], 1)
    weight = torch.tensor([[0.75, 0.25]]).repeat(N, 1)
    return q, buffer, queue, index, weight


def row_losses(backend, q, k, queue, index, weight, compiled=False):
    def loss_fn(q, k):
        return mk.info_nce(q, k, (index, weight), queue=queue, reduction="none", backend=backend)

    fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn
    q, k = leaf(q), leaf(k)
    rows = fn(q, k)
    rows.nan_to_num(0.0).sum().backward()
    return rows.detach(), q.grad, k.grad


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stray_targets_give_nan_rows_and_touch_nothing_else(backend, compiled, no_value_checks):
    q, buffer, queue, index, weight = problem()
    guard = buffer.clone()
    k = buffer[1:-1]
    stray_index = index.clone()
    for row, value in STRAY.items():
        stray_index[row, 0] = value
    rows, dq, dk = row_losses(backend, q, k, queue, stray_index, weight, compiled)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[list(STRAY)] = True
    assert rows[bad].isnan().all() and rows[~bad].isfinite().all()
    # the good rows are what they are without the bad ones (the bad rows' gradient is zero)
    good_weight = torch.where(bad[:, None], 0.0, weight)
    ref_rows, ref_dq, ref_dk = row_losses(backend, q, k, queue, index, good_weight, compiled)
    torch.testing.assert_close(rows[~bad], ref_rows[~bad])
    torch.testing.assert_close(dq, ref_dq)
    torch.testing.assert_close(dk, ref_dk)
    assert torch.equal(buffer, guard)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stray_padding_is_harmless(backend, no_value_checks):
    q, buffer, queue, index, weight = problem()
    k = buffer[1:-1]
    weight[:, 1] = 0.0
    stray_index = index.clone()
    stray_index[:, 1] = -7  # padding: a weight of 0 makes the index irrelevant
    rows, dq, dk = row_losses(backend, q, k, queue, stray_index, weight)
    ref_rows, ref_dq, ref_dk = row_losses(backend, q, k, queue, index, weight)
    for got, want in ((rows, ref_rows), (dq, ref_dq), (dk, ref_dk)):
        torch.testing.assert_close(got, want)


def test_value_checks_on_still_raise():
    q, buffer, queue, index, weight = problem()
    index[0, 0] = M
    with pytest.raises(ValueError, match=r"targets must index the rows of k in \[0, 5\)"):
        mk.info_nce(q, buffer[1:-1], (index, weight), queue=queue)


@requires_triton
def test_kernels_mask_stray_indices_themselves():
    """The Triton launchers, below the op's clean-up: the kernels never gather or scatter
    outside ``k`` (unmasked, the interpreter dies of a segmentation fault here), a stray
    target adds nothing to its row's loss, and the other rows' gradients are exact."""
    from mgc_kernels.triton import info_nce as kernels

    q, buffer, queue, index, weight = problem()
    k = buffer[1:-1]
    stray_index, padded = index.clone(), weight.clone()
    for row, value in STRAY.items():
        stray_index[row, 0], padded[row, 0] = value, 0.0
    good = torch.ones(N, dtype=torch.bool)
    good[list(STRAY)] = False
    got = kernels.info_nce(q, k, queue, stray_index, weight, 0.1)
    want = kernels.info_nce(q, k, queue, index, padded, 0.1)
    torch.testing.assert_close(got, want)
    grad = torch.where(good, 1.0, 0.0)
    dk = kernels.info_nce_backward(grad, q, k, queue, stray_index, weight, want[1], 0.1)
    want_dk = kernels.info_nce_backward(grad, q, k, queue, index, padded, want[1], 0.1)
    torch.testing.assert_close(dk, want_dk)
