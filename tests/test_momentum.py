"""mgc_kernels.momentum: update_momentum against the EMA written out per parameter (buffers
included), without autograd, mismatches rejected; momentum_copy; cosine_momentum against the
closed form and the reference trainer's former ``momentum_at`` (written out here)."""

import math

import pytest
import torch
from torch import nn

import mgc_kernels as mk


def net(seed: int, width: int = 6, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3)
    ).to(dtype)


def pair(dtype=torch.float32):
    """Online and momentum modules with different weights and different BN statistics."""
    online, momentum = net(0, dtype=dtype), net(1, dtype=dtype)
    online(torch.randn(8, 5, dtype=dtype))
    momentum(torch.randn(8, 5, dtype=dtype) * 3 + 1)
    return online, momentum


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.996, 0.9999, 1.0])
def test_update_momentum_is_the_ema_of_each_parameter(m):
    online, momentum = pair()
    before_o, before_m = snapshot(online), snapshot(momentum)
    mk.update_momentum(online, momentum, m)
    params = dict(momentum.named_parameters())
    for name, value in params.items():
        p_m, p_o = before_m[name], before_o[name]
        torch.testing.assert_close(value, m * p_m + (1 - m) * p_o, rtol=1e-6, atol=1e-7)
        assert torch.equal(value, torch.lerp(p_m, p_o, 1 - m))  # rounded once
    if m == 1.0:
        assert all(torch.equal(params[k], before_m[k]) for k in params)
    if m == 0.0:
        assert all(torch.equal(params[k], before_o[k]) for k in params)
    # buffers (BN running mean, var, count) stay the momentum module's own; online is untouched
    for name, value in momentum.named_buffers():
        assert torch.equal(value, before_m[name]), name
    for name, value in online.state_dict().items():
        assert torch.equal(value, before_o[name]), name


def test_update_momentum_buffers_copy():
    online, momentum = pair()
    before_o, before_m = snapshot(online), snapshot(momentum)
    mk.update_momentum(online, momentum, 0.9, buffers="copy")
    for name, value in momentum.named_buffers():
        assert torch.equal(value, before_o[name]), name
    for name, value in momentum.named_parameters():
        torch.testing.assert_close(value, 0.9 * before_m[name] + 0.1 * before_o[name])


def test_update_momentum_records_no_graph_and_keeps_requires_grad():
    online, momentum = pair()
    frozen = mk.momentum_copy(momentum)
    with torch.enable_grad():
        mk.update_momentum(online, momentum, 0.99)  # momentum still requires grad here
        mk.update_momentum(online, frozen, 0.99)
    for p in momentum.parameters():
        assert p.requires_grad and p.grad_fn is None and p.grad is None
    for p in frozen.parameters():
        assert not p.requires_grad and p.grad_fn is None
    assert all(p.grad is None for p in online.parameters())


def test_update_momentum_across_dtypes():
    """Online fp32 into an fp64 momentum module: the online values are converted first."""
    online, momentum = net(0), net(1, dtype=torch.float64)
    before_o, before_m = snapshot(online), snapshot(momentum)
    mk.update_momentum(online, momentum, 0.75)
    for name, value in momentum.named_parameters():
        assert value.dtype == torch.float64
        want = 0.75 * before_m[name] + 0.25 * before_o[name].double()
        torch.testing.assert_close(value, want, rtol=1e-15, atol=1e-16)


def test_update_momentum_rejects_mismatched_modules():
    online = net(0)
    with pytest.raises(ValueError, match="shape"):
        mk.update_momentum(online, net(0, width=7), 0.9)
    deeper = nn.Sequential(*net(0), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"parameters do not match.*not in online: \['4\.weight'"):
        mk.update_momentum(online, deeper, 0.9)
    renamed = nn.Sequential()
    for name, layer in zip("abcd", net(0)):
        renamed.add_module(name, layer)
    with pytest.raises(ValueError, match="parameters do not match"):
        mk.update_momentum(online, renamed, 0.9)
    no_stats = net(0)
    no_stats[1] = nn.BatchNorm1d(6, track_running_stats=False)
    mk.update_momentum(online, no_stats, 0.9)  # parameters match: fine
    with pytest.raises(ValueError, match="buffers do not match"):
        mk.update_momentum(online, no_stats, 0.9, buffers="copy")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(m=-0.1), ValueError, r"m must be a finite number in \[0, 1\]"),
        (dict(m=1.5), ValueError, r"m must be a finite number in \[0, 1\]"),
        (dict(m=float("nan")), ValueError, "m must be a finite"),
        (dict(m="0.9"), ValueError, "m must be a finite"),
        (dict(m=True), ValueError, "m must"),
        (dict(m=0.9, buffers="ema"), ValueError, "buffers must be one of"),
    ],
)
def test_update_momentum_validates_arguments(kwargs, error, match):
    online, momentum = pair()
    before = snapshot(momentum)
    with pytest.raises(error, match=match):
        mk.update_momentum(online, momentum, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in momentum.state_dict().items())


def test_update_momentum_wants_modules():
    with pytest.raises(TypeError, match="online must be a torch.nn.Module"):
        mk.update_momentum([torch.zeros(2)], net(0), 0.9)
    with pytest.raises(TypeError, match="momentum must be a torch.nn.Module"):
        mk.update_momentum(net(0), None, 0.9)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        mk.momentum_copy(torch.zeros(2))


def test_momentum_copy():
    online, _ = pair()
    online(torch.randn(4, 5)).sum().backward()  # online has gradients
    ema = mk.momentum_copy(online)
    assert ema is not online
    for (name, a), b in zip(online.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert all(not p.requires_grad and p.grad is None for p in ema.parameters())
    assert all(p.requires_grad and p.grad is not None for p in online.parameters())
    with torch.no_grad():
        online[0].weight.add_(1)
    assert not torch.equal(online[0].weight, ema[0].weight)


def old_momentum_at(step, total, start):
    """The reference trainer's schedule before it moved into the library."""
    return 1 - (1 - start) * (math.cos(math.pi * step / total) + 1) / 2


@pytest.mark.parametrize(
    "step, total, start",
    [
        (0, 100, 0.996),
        (1, 100, 0.996),
        (25, 100, 0.996),
        (50, 100, 0.996),
        (99, 100, 0.996),
        (100, 100, 0.996),
        (3, 7, 0.99),
        (2.5, 12.75, 0.999),
        (118.4, 120.0, 0.996),
        (0, 1, 0.5),
        (12345, 500000, 0.9995),
    ],
)
def test_cosine_momentum_equals_the_old_trainer_schedule_exactly(step, total, start):
    assert mk.cosine_momentum(step, total, start) == old_momentum_at(step, total, start)
    assert mk.cosine_momentum(step, total, start, 1.0) == old_momentum_at(step, total, start)


def test_cosine_momentum_closed_form():
    assert mk.cosine_momentum(0, 100) == 0.996
    assert mk.cosine_momentum(50, 100) == pytest.approx(0.998, abs=1e-15)
    assert mk.cosine_momentum(100, 100) == 1.0
    # cos(pi / 4) = sqrt(2) / 2, cos(3 pi / 4) = -sqrt(2) / 2
    assert mk.cosine_momentum(25, 100) == pytest.approx(1 - 0.002 * (1 + 2**-0.5), abs=1e-15)
    assert mk.cosine_momentum(75, 100) == pytest.approx(1 - 0.002 * (1 - 2**-0.5), abs=1e-15)
    # cos(pi / 3) = 1 / 2: three quarters of the way from start to end
    assert mk.cosine_momentum(1, 3, 0.9, 0.99) == pytest.approx(0.99 - 0.09 * 0.75, abs=1e-15)
    assert mk.cosine_momentum(0, 10, 0.2, 0.1) == 0.2  # any direction
    assert mk.cosine_momentum(10, 10, 0.2, 0.1) == 0.1
    values = [mk.cosine_momentum(s, 40) for s in range(41)]
    assert values == sorted(values)
    assert mk.cosine_momentum(500, 100) == mk.cosine_momentum(100.0001, 100) == 1.0  # past: end


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1, 100), "step must be a finite number >= 0"),
        ((float("inf"), 100), "step must be a finite"),
        ((0, 0), "total_steps must be a positive finite number"),
        ((0, -5), "total_steps must be a positive finite number"),
        ((0, "100"), "total_steps must be a positive finite number"),
        ((0, 100, 1.2), r"start must be a finite number in \[0, 1\]"),
        ((0, 100, 0.996, -0.1), r"end must be a finite number in \[0, 1\]"),
        ((None, 100), "step must be a finite"),
    ],
)
def test_cosine_momentum_validates_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        mk.cosine_momentum(*args)
