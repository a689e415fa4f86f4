"""MCLLoss against the formula written out here; montage slots = multigrain_pool regions; two ranks."""
import pytest
import torch
import torch.nn.functional as F

import mgc_kernels as mk
from mgc_kernels.losses.mcl import MCLLoss, default_level_weights
from mgc_kernels.transforms import montage

try:
    from ._distributed import run_ranks
except ImportError:
    from _distributed import run_ranks

TAU = 0.2


def leaf(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)


def level_inputs(batch, ratios, dim, gen):
    """Per-level online sub-image predictions and montage sources of both views, plus keys."""
    q1 = [leaf(batch, r * r, dim, gen=gen) for r in ratios]
    q2 = [leaf(batch, r * r, dim, gen=gen) for r in ratios]
    s1 = [montage(torch.zeros(batch, 1, r, r), r, generator=gen)[1] for r in ratios]
    s2 = [montage(torch.zeros(batch, 1, r, r), r, generator=gen)[1] for r in ratios]
    k1, k2 = leaf(batch, dim, gen=gen), leaf(batch, dim, gen=gen)
    return q1, q2, k1, k2, s1, s2


def direct(q1, q2, k1, k2, s1, s2, weights, tau=TAU, offset=0):
    """sum_l w_l (CE(q1_l vs all k2, source) + CE(q2_l vs all k1, source)) / sum_l w_l."""
    total = 0
    for level, w in enumerate(weights):
        for q, k, s in ((q1[level], k2, s1[level]), (q2[level], k1, s2[level])):
            logits = F.normalize(q.reshape(-1, q.shape[-1]), dim=1) @ F.normalize(k, dim=1).T / tau
            total = total + w * F.cross_entropy(logits, s.reshape(-1) + offset)
    return total / sum(weights)


def test_default_hyperparameters():
    crit = MCLLoss()
    assert crit.ratios == (1, 2, 7) and crit.cells == (14, 7, 2)
    assert crit.level_weights == (0.5, 0.25, 0.25) and crit.temperature == TAU
    assert default_level_weights(4) == (0.5, 0.25, 0.125, 0.125)   # the paper's four levels
    assert default_level_weights(1) == (1.0,)
    assert MCLLoss(ratios=(1, 2, 7, 14)).level_weights == (0.5, 0.25, 0.125, 0.125)


@pytest.mark.parametrize("ratios, weights", [((1, 2, 7), None), ((2, 7, 14), (3.0, 0.0, 1.0)),
                                             ((7,), None)])
def test_equals_direct_formula(ratios, weights):
    gen = torch.Generator().manual_seed(0)
    inputs = level_inputs(5, ratios, 8, gen)
    crit = MCLLoss(ratios=ratios, level_weights=weights)
    loss = crit(*inputs)
    expected = direct(*inputs, weights=crit.level_weights)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-12)
    q1, q2, k1, k2, _, _ = inputs
    leaves = [*q1, *q2, k1, k2]
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


def test_level_weights_are_normalised():
    gen = torch.Generator().manual_seed(1)
    inputs = level_inputs(3, (1, 2, 7), 4, gen)
    default = MCLLoss()(*inputs)
    scaled = MCLLoss(level_weights=(2, 1, 1))(*inputs)
    assert torch.allclose(default, scaled, rtol=1e-12)


def test_float32_inputs_give_a_float32_loss_close_to_float64():
    gen = torch.Generator().manual_seed(2)
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
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    sources = [montage(torch.zeros(4, 1, 2, 2), 2, generator=gen)[1]]
    crit = MCLLoss(ratios=(2,), temperature=0.05)
    right = [k[sources[0]]]                      # [4, 4, 8]: slot s predicts key sources[b, s]
    wrong = [k[(sources[0] + 1) % 4]]
    assert crit(right, right, k, k, sources, sources) < 0.1
    assert crit(wrong, wrong, k, k, sources, sources) > 5


@pytest.mark.parametrize("ratio", [1, 2, 7])
def test_montage_slot_is_multigrain_pool_region(ratio):
    # A token-grid stand-in: 28 x 28 px images, 2 x 2 px patches -> a 14 x 14 grid of tokens from
    # a linear patch embedding. Slot s of a ratio-r montage is 28 / r px = 14 / r tokens a side,
    # so region s of multigrain_pool(cells=(14 // r,)) is the embedding of sub-image s, i.e. of
    # the downsampled source image sources[b, s].
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(6, 3, 28, 28, generator=gen, dtype=torch.float64)
    embed = torch.nn.Conv2d(3, 5, kernel_size=2, stride=2).double()

    def tokens_of(x):                             # [B, 3, h, w] -> [B, h * w / 4, 5]
        return embed(x).flatten(2).transpose(1, 2)

    m, sources = montage(images, ratio, generator=gen)
    regions = mk.multigrain_pool(tokens_of(m), 14, (MCLLoss(ratios=(ratio,)).cells[0],))[0]
    assert regions.shape == (6, ratio * ratio, 5)
    small = F.interpolate(images, size=(28 // ratio, 28 // ratio), mode="bilinear",
                          align_corners=False, antialias=True)
    per_image = tokens_of(small).mean(1)          # [B, 5]: each downsampled image, pooled
    torch.testing.assert_close(regions, per_image[sources], rtol=1e-10, atol=1e-12)


def test_constant_colour_montage_regions_know_their_source():
    # Known answer: image b is the constant b; every pooled region of a 2 x 2-token-cell (ratio
    # 7) montage is exactly the number of its source image.
    images = torch.arange(8, dtype=torch.float64)[:, None, None, None].expand(8, 1, 14, 14)
    m, sources = montage(images, 7, generator=torch.Generator().manual_seed(5))
    regions = mk.multigrain_pool(m.flatten(2).transpose(1, 2).contiguous(), 14, (2,))[0]
    torch.testing.assert_close(regions[..., 0], sources.double())


@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_compile_fullgraph(compiler):
    gen = torch.Generator().manual_seed(6)
    q1, q2, k1, k2, s1, s2 = level_inputs(3, (1, 2, 7), 8, gen)
    crit = MCLLoss()
    eager = crit(q1, q2, k1, k2, s1, s2)
    torch._dynamo.reset()
    compiled = torch.compile(crit, fullgraph=True, backend=compiler)(q1, q2, k1, k2, s1, s2)
    assert torch.allclose(compiled, eager, rtol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    ({"ratios": (1, 3)}, "ratios must each divide grid"),
    ({"ratios": (1, 2, 7), "grid": 16}, "ratios must each divide grid"),
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
    ({"grid": 0}, "grid"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCLLoss(**kwargs)


def test_bad_forward_inputs():
    gen = torch.Generator().manual_seed(7)
    crit = MCLLoss(ratios=(1, 2))
    q1, q2, k1, k2, s1, s2 = level_inputs(3, (1, 2), 4, gen)
    with pytest.raises(ValueError, match="q1 must be a list"):
        crit(q1[0], q2, k1, k2, s1, s2)
    with pytest.raises(ValueError, match="sources2 must be a list"):
        crit(q1, q2, k1, k2, s1, s2[:1])
    with pytest.raises(ValueError, match=r"q1\[1\]"):
        crit([q1[0], q1[0]], q2, k1, k2, s1, s2)
    with pytest.raises(ValueError, match=r"q2\[0\]"):
        crit(q1, [torch.randn(3, 1, 5, dtype=torch.float64), q2[1]], k1, k2, s1, s2)
    with pytest.raises(ValueError, match="k2"):
        crit(q1, q2, k1, k2[:2], s1, s2)
    with pytest.raises(ValueError, match="k1"):
        crit(q1, q2, k1[0], k2, s1, s2)
    with pytest.raises(ValueError, match=r"sources1\[1\]"):
        crit(q1, q2, k1, k2, [s1[0], s1[1] + 3], s2)
    with pytest.raises(ValueError, match=r"sources2\[1\]"):
        crit(q1, q2, k1, k2, s1, [s2[0], s2[1][:, :2]])
    with pytest.raises(TypeError, match=r"sources2\[0\]"):
        crit(q1, q2, k1, k2, s1, [s2[0].double(), s2[1]])
    with pytest.raises(TypeError, match=r"q1\[0\] must have the dtype of k1"):
        crit(q1, q2, k1.float(), k2.float(), s1, s2)


# ----------------------------------------------------------------------------- two ranks

def _two_rank_losses(rank, world):
    """Every rank builds the full batch from one seed, keeps its half (its montages draw sources
    from its own half), and returns its loss and gradients; rank -1 is one process over the
    whole batch, whose sources index the concatenated batch."""
    gen = torch.Generator().manual_seed(8)
    batch, ratios, dim = 4, (1, 2, 7), 6
    half = batch // 2
    full = [[torch.randn(batch, r * r, dim, generator=gen, dtype=torch.float64) for r in ratios]
            for _ in range(2)]
    keys = [torch.randn(batch, dim, generator=gen, dtype=torch.float64) for _ in range(2)]
    local = [[[montage(torch.zeros(half, 1, r, r), r, generator=gen)[1] for r in ratios]
              for _ in range(2)] for _ in range(2)]
    crit = MCLLoss(ratios=ratios, gather_distributed=rank >= 0)
    if rank < 0:
        part = slice(None)
        sources = [[torch.cat([local[p][v][level] + p * half for p in range(2)])
                    for level in range(len(ratios))] for v in range(2)]
    else:
        part = slice(rank * half, (rank + 1) * half)
        sources = local[rank]
    q1, q2 = ([t[part].clone().requires_grad_() for t in x] for x in full)
    k1, k2 = (k[part].clone().requires_grad_() for k in keys)
    loss = crit(q1, q2, k1, k2, *sources)
    grads = torch.autograd.grad(loss, [*q1, *q2, k1, k2])
    return {"loss": loss.detach(), "grads": [g.detach() for g in grads]}


def test_two_ranks_equal_one_process_over_the_whole_batch():
    single = _two_rank_losses(-1, 1)
    ranks = run_ranks(_two_rank_losses, 2)
    # DDP averages over ranks: the mean loss is the one-process loss, and each rank's gradient
    # divided by the world size is the one-process gradient of its rows
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"], rtol=1e-10)
    for i, g in enumerate(single["grads"]):
        halves = torch.cat([ranks[0]["grads"][i], ranks[1]["grads"][i]]) / 2
        assert torch.allclose(halves, g, rtol=1e-8, atol=1e-12)
