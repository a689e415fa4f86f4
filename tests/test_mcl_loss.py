"""MCLLoss against the released loss written out here; montage slots = multigrain_pool regions;
detached keys; two ranks."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mgc_kernels as mk
from _distributed import run_ranks
from mgc_kernels.losses.mcl import MCLLoss, default_level_weights
from mgc_kernels.transforms import montage


def leaf(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)


def level_inputs(batch, ratios, dim, gen, counts=(None, None)):
    """Per-level online sub-image predictions ``[M_l, r**2, D]`` and montage sources of both
    views, plus keys ``[B, D]``. ``counts[v]``: view v's montages per level, an int for every
    level, a tuple with one per level, or None for montage's default ``ceil(B / r**2)``."""
    q, s = [], []
    for count in counts:
        per_level = count if isinstance(count, tuple) else (count,) * len(ratios)
        sources = [
            montage(torch.zeros(batch, 1, r, r), r, c, generator=gen)[1]
            for r, c in zip(ratios, per_level)
        ]
        s.append(sources)
        q.append([leaf(len(src), r * r, dim, gen=gen) for r, src in zip(ratios, sources)])
    k1, k2 = leaf(batch, dim, gen=gen), leaf(batch, dim, gen=gen)
    return q[0], q[1], k1, k2, s[0], s[1]


def released(q1, q2, k1, k2, s1, s2, weights, temperature=1.0, scale=None, offset=0):
    """The released loss: per level and direction, 2T * mean over sub-images of
    CE(l2n(q) @ l2n(k).T / T, source), keys without gradient, weighted by the level weights
    (normalised by their sum, which is 1 for the released weights), both directions summed."""
    scale = 2 * temperature if scale is None else scale
    total = 0
    for level, w in enumerate(weights):
        for q, k, s in ((q1[level], k2, s1[level]), (q2[level], k1, s2[level])):
            logits = (
                F.normalize(q.reshape(-1, q.shape[-1]), dim=1)
                @ F.normalize(k.detach(), dim=1).T
                / temperature
            )
            total = total + w * scale * F.cross_entropy(logits, s.reshape(-1) + offset)
    return total / sum(weights)


def test_default_hyperparameters_are_the_released_ones():
    crit = MCLLoss()
    assert crit.ratios == (1, 2, 7) and crit.cells == (14, 7, 2)
    assert crit.level_weights == (0.5, 0.25, 0.25)
    assert crit.temperature == 1.0 and crit.loss_scale == 2.0  # T = 1, CE times 2T
    assert MCLLoss(temperature=0.3).loss_scale == pytest.approx(0.6)
    assert MCLLoss(temperature=0.2, loss_scale=1.0).loss_scale == 1.0
    assert default_level_weights(4) == (0.5, 0.25, 0.125, 0.125)  # the released four levels
    assert default_level_weights(1) == (1.0,)
    released_levels = MCLLoss(ratios=(1, 2, 4, 8), grid=56)
    assert released_levels.level_weights == (0.5, 0.25, 0.125, 0.125)
    assert released_levels.cells == (56, 28, 14, 7)
    assert "loss_scale=2.0" in repr(crit)


@pytest.mark.parametrize(
    "ratios, weights, grid, counts",
    [
        ((1, 2, 7), None, 14, (None, None)),
        ((1, 2, 4, 8), None, 56, (None, None)),
        ((1, 2, 4, 8), None, 56, ((5, 2, 1, 1), (5, 3, 2, 1))),  # the release's B/32 at ratio 8
        ((2, 7, 14), (3.0, 0.0, 1.0), 14, (None, None)),
        ((7,), None, 14, (None, None)),
    ],
)
def test_equals_the_released_formula(ratios, weights, grid, counts):
    gen = torch.Generator().manual_seed(0)
    inputs = level_inputs(5, ratios, 8, gen, counts)
    crit = MCLLoss(ratios=ratios, level_weights=weights, grid=grid)
    loss = crit(*inputs)
    expected = released(*inputs, weights=crit.level_weights)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-12)
    leaves = [*inputs[0], *inputs[1]]
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 9),
    dim=st.integers(1, 6),
    temperature=st.floats(0.05, 2.0),
    scale=st.one_of(st.none(), st.floats(0.1, 3.0)),
    seed=st.integers(0, 2**31),
    counts=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_equals_the_released_formula_for_any_montage_counts(
    batch, dim, temperature, scale, seed, counts
):
    gen = torch.Generator().manual_seed(seed)
    inputs = level_inputs(batch, (1, 2, 7), dim, gen, counts)
    crit = MCLLoss(temperature=temperature, loss_scale=scale)
    loss = crit(*inputs)
    expected = released(*inputs, crit.level_weights, temperature, scale)
    assert torch.allclose(loss, expected, rtol=1e-10)
    leaves = [*inputs[0], *inputs[1]]
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-12)


def test_keys_get_no_gradient_even_when_they_require_it():
    gen = torch.Generator().manual_seed(1)
    q1, q2, k1, k2, s1, s2 = level_inputs(4, (1, 2, 7), 6, gen)
    assert k1.requires_grad and k2.requires_grad
    loss = MCLLoss()(q1, q2, k1, k2, s1, s2)
    assert loss.requires_grad
    assert torch.autograd.grad(loss, [k1, k2], allow_unused=True) == (None, None)
    loss = MCLLoss()(q1, q2, k1, k2, s1, s2)
    loss.backward()
    assert k1.grad is None and k2.grad is None
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in (*q1, *q2))


def test_keys_computed_with_a_graph_upstream_get_none_either():
    # keys that come out of a layer with parameters: the layer gets no gradient from the loss
    gen = torch.Generator().manual_seed(2)
    q1, q2, _, _, s1, s2 = level_inputs(4, (1, 2), 6, gen)
    layer = torch.nn.Linear(6, 6).double()
    k = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    MCLLoss(ratios=(1, 2))(q1, q2, layer(k[0]), layer(k[1]), s1, s2).backward()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_old_defaults_stay_reachable():
    # temperature 0.2 without the 2T factor, B montages per level: the earlier behaviour
    gen = torch.Generator().manual_seed(3)
    batch, ratios = 4, (1, 2, 7)
    inputs = level_inputs(batch, ratios, 8, gen, counts=(batch, batch))
    loss = MCLLoss(temperature=0.2, loss_scale=1.0)(*inputs)
    q1, q2, k1, k2, s1, s2 = inputs
    total = 0
    for level, w in enumerate((0.5, 0.25, 0.25)):
        for q, k, s in ((q1[level], k2, s1[level]), (q2[level], k1, s2[level])):
            logits = F.normalize(q.reshape(-1, 8), dim=1) @ F.normalize(k, dim=1).T / 0.2
            total = total + w * F.cross_entropy(logits, s.reshape(-1))
    assert torch.allclose(loss, total, rtol=1e-12)
    # the released scale multiplies the unscaled loss by 2T
    assert torch.allclose(MCLLoss(temperature=0.2)(*inputs), 0.4 * total, rtol=1e-12)


def test_level_weights_are_normalised():
    gen = torch.Generator().manual_seed(4)
    inputs = level_inputs(3, (1, 2, 7), 4, gen)
    default = MCLLoss()(*inputs)
    scaled = MCLLoss(level_weights=(2, 1, 1))(*inputs)
    assert torch.allclose(default, scaled, rtol=1e-12)


def test_float32_inputs_give_a_float32_loss_close_to_float64():
    gen = torch.Generator().manual_seed(5)
    inputs = level_inputs(4, (1, 2, 7), 16, gen)
    crit = MCLLoss()
    exact = crit(*inputs)
    q1, q2, k1, k2, s1, s2 = inputs
    loss = crit([q.float() for q in q1], [q.float() for q in q2], k1.float(), k2.float(), s1, s2)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double(), exact, rtol=1e-5)


def test_positive_is_the_source_image():
    # a sub-image whose prediction equals its source's key costs less than one that points at
    # another image: the target really is the source's key, not the slot or the row
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    sources = [montage(torch.zeros(4, 1, 2, 2), 2, 3, generator=gen)[1]]
    crit = MCLLoss(ratios=(2,), temperature=0.05)
    right = [k[sources[0]]]  # [3, 4, 8]: slot s predicts key sources[m, s]
    wrong = [k[(sources[0] + 1) % 4]]
    assert crit(right, right, k, k, sources, sources) < 0.01
    assert crit(wrong, wrong, k, k, sources, sources) > 0.5


@pytest.mark.parametrize("ratio", [1, 2, 7])
def test_montage_slot_is_multigrain_pool_region(ratio):
    # A token-grid stand-in: 28 x 28 px images, 2 x 2 px patches -> a 14 x 14 grid of tokens from
    # a linear patch embedding. Slot s of a ratio-r montage is 28 / r px = 14 / r tokens a side,
    # so region s of multigrain_pool(cells=(14 // r,)) is the embedding of sub-image s, i.e. of
    # the downsampled source image sources[m, s].
    gen = torch.Generator().manual_seed(7)
    images = torch.rand(6, 3, 28, 28, generator=gen, dtype=torch.float64)
    embed = torch.nn.Conv2d(3, 5, kernel_size=2, stride=2).double()

    def tokens_of(x):  # [B, 3, h, w] -> [B, h * w / 4, 5]
        return embed(x).flatten(2).transpose(1, 2)

    m, sources = montage(images, ratio, generator=gen)
    count = math.ceil(6 / ratio**2)
    regions = mk.multigrain_pool(tokens_of(m), 14, (MCLLoss(ratios=(ratio,)).cells[0],))[0]
    assert regions.shape == (count, ratio * ratio, 5)
    per_image = tokens_of(images[:, :, ::ratio, ::ratio]).mean(1)  # each nearest-downsampled
    torch.testing.assert_close(regions, per_image[sources], rtol=1e-10, atol=1e-12)


def test_constant_colour_montage_regions_know_their_source():
    # Known answer: image b is the constant b; every pooled region of a 2 x 2-token-cell (ratio
    # 7) montage is exactly the number of its source image.
    images = torch.arange(8, dtype=torch.float64)[:, None, None, None].expand(8, 1, 14, 14)
    m, sources = montage(images, 7, generator=torch.Generator().manual_seed(8))
    regions = mk.multigrain_pool(m.flatten(2).transpose(1, 2).contiguous(), 14, (2,))[0]
    torch.testing.assert_close(regions[..., 0], sources.double())


@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_compile_fullgraph(compiler):
    gen = torch.Generator().manual_seed(9)
    q1, q2, k1, k2, s1, s2 = level_inputs(3, (1, 2, 7), 8, gen)
    crit = MCLLoss()
    eager = crit(q1, q2, k1, k2, s1, s2)
    torch._dynamo.reset()
    compiled = torch.compile(crit, fullgraph=True, backend=compiler)(q1, q2, k1, k2, s1, s2)
    assert torch.allclose(compiled, eager, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratios": (1, 3)}, "ratios must each divide grid"),
        ({"ratios": (1, 2, 7), "grid": 16}, "ratios must each divide grid"),
        ({"ratios": (1, 2, 4, 8)}, "ratios must each divide grid"),
        ({"ratios": ()}, "ratios"),
        ({"ratios": 2}, "ratios"),
        ({"ratios": (1, 1.5)}, "ratios"),
        ({"ratios": (0, 2)}, "ratios"),
        ({"ratios": (2, 1, 7)}, "strictly increasing"),
        ({"ratios": (1, 1, 7)}, "strictly increasing"),
        ({"level_weights": (1, 1)}, "level_weights"),
        ({"level_weights": (0, 0, 0)}, "level_weights"),
        ({"level_weights": (-1, 1, 1)}, "level_weights"),
        ({"level_weights": (float("nan"), 1, 1)}, "level_weights"),
        ({"level_weights": 1.0}, "level_weights"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.2}, "temperature"),
        ({"loss_scale": 0.0}, "loss_scale"),
        ({"loss_scale": -1.0}, "loss_scale"),
        ({"loss_scale": float("inf")}, "loss_scale"),
        ({"loss_scale": True}, "loss_scale"),
        ({"loss_scale": "2"}, "loss_scale"),
        ({"grid": 0}, "grid"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCLLoss(**kwargs)


def test_bad_forward_inputs():
    gen = torch.Generator().manual_seed(10)
    crit = MCLLoss(ratios=(1, 2))
    q1, q2, k1, k2, s1, s2 = level_inputs(3, (1, 2), 4, gen)
    with pytest.raises(ValueError, match="q1 must be a list"):
        crit(q1[0], q2, k1, k2, s1, s2)
    with pytest.raises(ValueError, match="sources2 must be a list"):
        crit(q1, q2, k1, k2, s1, s2[:1])
    with pytest.raises(ValueError, match=r"q1\[1\] must be \[M, ratio\*\*2, D\] = \[M, 4, 4\]"):
        crit([q1[0], q1[0]], q2, k1, k2, s1, s2)
    with pytest.raises(ValueError, match=r"q2\[0\]"):
        crit(q1, [torch.randn(3, 1, 5, dtype=torch.float64), q2[1]], k1, k2, s1, s2)
    with pytest.raises(ValueError, match=r"q2\[1\]"):
        crit(q1, [q2[0], torch.randn(0, 4, 4, dtype=torch.float64)], k1, k2, s1, s2)
    with pytest.raises(ValueError, match=r"q1\[0\] must have 3 dimensions"):
        crit([q1[0][0], q1[1]], q2, k1, k2, s1, s2)
    with pytest.raises(ValueError, match="k2"):
        crit(q1, q2, k1, k2[:2], s1, s2)
    with pytest.raises(ValueError, match="k1"):
        crit(q1, q2, k1[0], k2, s1, s2)
    with pytest.raises(ValueError, match=r"sources1\[1\] must index"):
        crit(q1, q2, k1, k2, [s1[0], s1[1] + 3], s2)
    with pytest.raises(ValueError, match=r"sources2\[1\] must be \[M, ratio\*\*2\]"):
        crit(q1, q2, k1, k2, s1, [s2[0], s2[1][:, :2]])
    # montage counts of q and sources must agree
    with pytest.raises(ValueError, match=r"sources1\[0\] must be \[M, ratio\*\*2\] = \[3, 1\]"):
        crit(q1, q2, k1, k2, [s1[0][:2], s1[1]], s2)
    with pytest.raises(TypeError, match=r"sources2\[0\]"):
        crit(q1, q2, k1, k2, s1, [s2[0].double(), s2[1]])
    with pytest.raises(TypeError, match=r"q1\[0\] must have the dtype of k1"):
        crit(q1, q2, k1.float(), k2.float(), s1, s2)


# ----------------------------------------------------------------------------- two ranks


def _two_rank_losses(rank, world):
    """Every rank builds the full batch from one seed, keeps its half (its montages draw sources
    from its own half), and returns its loss and query gradients; rank -1 is one process over
    all ranks' montages, whose sources index the concatenated batch."""
    gen = torch.Generator().manual_seed(11)
    batch, ratios, dim = 4, (1, 2, 7), 6
    half = batch // 2
    local = [
        [
            [montage(torch.zeros(half, 1, r, r), r, generator=gen)[1] for r in ratios]
            for _ in range(2)
        ]
        for _ in range(2)
    ]  # [rank][view][level]
    full = [
        [
            [
                torch.randn(len(local[p][v][level]), r * r, dim, generator=gen, dtype=torch.float64)
                for p in range(2)
            ]
            for level, r in enumerate(ratios)
        ]
        for v in range(2)
    ]  # [view][level][rank]
    keys = [torch.randn(batch, dim, generator=gen, dtype=torch.float64) for _ in range(2)]
    crit = MCLLoss(ratios=ratios, gather_distributed=rank >= 0)
    if rank < 0:
        sources = [
            [
                torch.cat([local[p][v][level] + p * half for p in range(2)])
                for level in range(len(ratios))
            ]
            for v in range(2)
        ]
        q1, q2 = ([torch.cat(per_rank).requires_grad_() for per_rank in x] for x in full)
        k1, k2 = (k.clone().requires_grad_() for k in keys)
    else:
        sources = local[rank]
        q1, q2 = ([per_rank[rank].clone().requires_grad_() for per_rank in x] for x in full)
        k1, k2 = (k[rank * half : (rank + 1) * half].clone().requires_grad_() for k in keys)
    loss = crit(q1, q2, k1, k2, *sources)
    grads = torch.autograd.grad(loss, [*q1, *q2])
    assert torch.autograd.grad(loss, [k1, k2], allow_unused=True) == (None, None)
    return {"loss": loss.detach(), "grads": [g.detach() for g in grads]}


def test_two_ranks_equal_one_process_over_the_whole_batch():
    single = _two_rank_losses(-1, 1)
    ranks = run_ranks(_two_rank_losses, 2)
    # every rank has as many montages per level, so DDP's mean over ranks is the one-process
    # loss, and each rank's gradient divided by the world size is the one-process gradient of
    # its rows
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"], rtol=1e-10)
    for i, g in enumerate(single["grads"]):
        own = len(ranks[0]["grads"][i])
        halves = torch.cat([ranks[0]["grads"][i], ranks[1]["grads"][i]]) / 2
        assert len(g) == 2 * own
        assert torch.allclose(halves, g, rtol=1e-8, atol=1e-12)
