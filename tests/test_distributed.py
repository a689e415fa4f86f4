"""mgc_kernels.distributed on two gloo CPU processes, and its single-process fallbacks."""

import pytest
import torch
import torch.distributed as dist

from _distributed import run_ranks
from mgc_kernels import distributed as mkd

ROWS, COLS = 3, 4  # rows per rank


def _inputs(seed, world_size):
    """Full batch and per-rank coefficients, identical on every rank and in the parent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world_size * ROWS, COLS, generator=g, dtype=torch.float64)
    c = torch.randn(world_size, world_size * ROWS, COLS, generator=g, dtype=torch.float64)
    return x, c


def _rank_loss(gathered, local, c):
    # Nonlinear in the gathered rows, plus a term that uses the local rows directly.
    return (gathered * c).sum() + (gathered.pow(2) * c).sum() + local.pow(3).sum()


def _two_rank_checks(rank, world_size, seed):
    x, c = _inputs(seed, world_size)
    out = {"rank": mkd.rank(), "world_size": mkd.world_size()}

    # forward, including a non-contiguous input and an integer tensor
    mine = x.chunk(world_size)[rank].clone().requires_grad_()
    gathered = mkd.gather(mine)
    out["gathered"] = gathered.detach()
    out["gathered_t"] = mkd.gather(x.chunk(world_size)[rank].t().contiguous().t())
    out["gathered_long"] = mkd.gather(torch.arange(ROWS) + 100 * rank)
    out["no_grad_input"] = mkd.gather(mine.detach()).requires_grad

    # backward
    _rank_loss(gathered, mine, c[rank]).backward()
    out["grad"] = mine.grad

    # all_reduce_sum
    v = torch.tensor([1.0, 2.0], requires_grad=True) * (rank + 1)
    before = v.detach().clone()
    s = mkd.all_reduce_sum(v)
    out["sum"] = s
    out["sum_requires_grad"] = s.requires_grad
    out["input_untouched"] = torch.equal(v.detach(), before)
    return out


def test_gather_and_all_reduce_sum_on_two_ranks():
    world_size, seed = 2, 1234
    results = run_ranks(_two_rank_checks, world_size, seed)
    x, c = _inputs(seed, world_size)

    # expected gradient: one process, sum over ranks of each rank's loss on the full batch
    full = x.clone().requires_grad_()
    sum(_rank_loss(full, full.chunk(world_size)[r], c[r]) for r in range(world_size)).backward()
    expected = full.grad.chunk(world_size)

    for r, out in enumerate(results):
        assert out["rank"] == r and out["world_size"] == world_size
        torch.testing.assert_close(out["gathered"], x, rtol=0, atol=0)
        torch.testing.assert_close(out["gathered_t"], x, rtol=0, atol=0)
        assert torch.equal(out["gathered_long"], torch.tensor([0, 1, 2, 100, 101, 102]))
        assert out["no_grad_input"] is False
        torch.testing.assert_close(out["grad"], expected[r])
        torch.testing.assert_close(out["sum"], torch.tensor([3.0, 6.0]))
        assert out["sum_requires_grad"] is False
        assert out["input_untouched"]


def _world_of_one(rank, world_size):
    x = torch.randn(2, 3, requires_grad=True)
    s = mkd.all_reduce_sum(x)
    return {
        "identity": mkd.gather(x) is x,
        "sum_ok": torch.equal(s, x.detach()) and s.data_ptr() != x.data_ptr(),
        "rank": mkd.rank(),
        "world_size": mkd.world_size(),
    }


def test_world_size_one_process_group_is_identity():
    (out,) = run_ranks(_world_of_one, 1)
    assert out == {"identity": True, "sum_ok": True, "rank": 0, "world_size": 1}


def test_no_process_group_fallbacks():
    assert not (dist.is_available() and dist.is_initialized())
    assert mkd.rank() == 0 and mkd.world_size() == 1
    x = torch.randn(4, 3, requires_grad=True)
    assert mkd.gather(x) is x
    before = x.detach().clone()
    s = mkd.all_reduce_sum(x)
    assert torch.equal(s, before) and torch.equal(x.detach(), before)
    assert not s.requires_grad and s.data_ptr() != x.data_ptr()


def _fail_on_last_rank(rank, world_size):
    if rank == world_size - 1:
        raise ValueError("boom from the last rank")
    return rank


def test_run_ranks_reraises_child_errors_with_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 0 of 1 raised.*ValueError: boom"):
        run_ranks(_fail_on_last_rank, 1)
