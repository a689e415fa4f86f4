"""Tests of mgc_kernels.transforms.montage: MCL's r x r tiling of downsampled batch images."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mgc_kernels.transforms import montage


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def constant_images(batch, channels, height, width):
    """Image b is one colour: channel c holds 10 * c + b (distinct for every image)."""
    colours = torch.arange(channels)[None, :] * 10.0 + torch.arange(batch)[:, None]
    return colours[:, :, None, None].expand(batch, channels, height, width).clone()


def tile(m, ratio, s):
    """Slot s (row-major) of montages m [M, C, H, W]."""
    h, w = m.shape[2] // ratio, m.shape[3] // ratio
    row, col = divmod(s, ratio)
    return m[:, :, row * h : (row + 1) * h, col * w : (col + 1) * w]


# ----------------------------------------------------------------------------- counts and draws


@pytest.mark.parametrize(
    "batch, ratio, count",
    [(5, 2, 2), (8, 2, 2), (9, 2, 3), (4, 7, 1), (256, 2, 64), (256, 7, 6), (256, 8, 4), (3, 1, 3)],
)
def test_default_count_is_the_fewest_that_hold_every_image(batch, ratio, count):
    m, sources = montage(torch.rand(batch, 1, 8 * ratio, 8 * ratio), ratio, generator=seeded(0))
    assert count == math.ceil(batch / ratio**2)
    assert m.shape == (count, 1, 8 * ratio, 8 * ratio) and sources.shape == (count, ratio**2)
    assert set(sources.flatten().tolist()) == set(range(batch))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 40),
    ratio=st.integers(1, 7),
    count=st.integers(1, 30),
    seed=st.integers(0, 2**31),
)
def test_coverage_and_no_repeats_where_possible(batch, ratio, count, seed):
    slots = ratio * ratio
    _, sources = montage(torch.zeros(batch, 1, ratio, ratio), ratio, count, generator=seeded(seed))
    assert sources.shape == (count, slots) and sources.dtype == torch.long
    assert ((sources >= 0) & (sources < batch)).all()
    flat = sources.flatten().tolist()
    if count * slots >= batch:
        assert set(flat) == set(range(batch))  # every image at least once
        if not (ratio == 1 and count == batch):
            assert sorted(flat[:batch]) == list(range(batch))  # a permutation first
    else:
        assert len(set(flat)) == len(flat)  # a subset, each image at most once
    for row in sources.tolist():  # no image twice in a montage while the
        for image in set(row):  # batch has others left for it
            assert row.count(image) <= math.ceil(slots / batch)


def test_fillers_avoid_the_images_a_montage_already_holds():
    # 6 images, 2 montages of 4: the permutation fills montage 0 and half of montage 1; the two
    # free slots of montage 1 take two of the four images it does not hold
    for seed in range(20):
        _, sources = montage(torch.zeros(6, 1, 2, 2), 2, generator=seeded(seed))
        assert sources.shape == (2, 4)
        assert len(set(sources[1].tolist())) == 4
        assert sorted(sources.flatten()[:6].tolist()) == list(range(6))


def test_ratio_one_with_the_default_count_is_the_identity():
    images = torch.rand(4, 3, 10, 6)
    for count in (None, 4):
        m, sources = montage(images, 1, count, generator=seeded(4))
        assert torch.equal(m, images) and m.data_ptr() != images.data_ptr()
        assert torch.equal(sources, torch.arange(4)[:, None])
    m, sources = montage(images, 1, 2, generator=seeded(4))  # another count: a random subset
    assert m.shape == (2, 3, 10, 6) and torch.equal(m, images[sources[:, 0]])


def test_reproducible_with_a_seed():
    images = torch.rand(8, 3, 14, 14)
    a, b = (montage(images, 7, 3, generator=seeded(5)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(montage(images, 2, generator=seeded(s))[1].flatten().tolist()) for s in range(5)}
    assert len(draws) > 1


def test_global_rng_draws_follow_torch_manual_seed():
    images = torch.rand(10, 1, 4, 4)
    torch.manual_seed(3)
    a = montage(images, 2)[1]
    torch.manual_seed(3)
    assert torch.equal(a, montage(images, 2)[1])


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("ratio, height, width", [(2, 8, 8), (3, 12, 6), (7, 14, 28), (4, 16, 8)])
def test_nearest_tiles_are_every_ratio_th_pixel_exactly(ratio, height, width):
    images = torch.rand(5, 3, height, width, dtype=torch.float64)
    m, sources = montage(images, ratio, 4, generator=seeded(0))
    assert m.shape == (4, 3, height, width) and m.dtype == torch.float64
    nearest = F.interpolate(images, scale_factor=1 / ratio, mode="nearest")
    for s in range(ratio * ratio):
        assert torch.equal(tile(m, ratio, s), images[sources[:, s], :, ::ratio, ::ratio])
        assert torch.equal(tile(m, ratio, s), nearest[sources[:, s]])  # the released resize


def test_nearest_keeps_uint8_exact():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=seeded(1))
    m, sources = montage(images, 4, 2, generator=seeded(3))
    assert m.dtype == torch.uint8
    for s in range(16):
        assert torch.equal(tile(m, 4, s), images[sources[:, s], :, ::4, ::4])


@pytest.mark.parametrize("ratio", [2, 3, 7])
def test_constant_colour_tiles_show_their_source(ratio):
    images = constant_images(6, 3, 7 * ratio, 14 * ratio)
    for resize in ("nearest", "bilinear"):
        m, sources = montage(images, ratio, 5, resize=resize, generator=seeded(1))
        for s in range(ratio * ratio):
            expected = images[sources[:, s], :, :1, :1].expand_as(tile(m, ratio, s))
            torch.testing.assert_close(tile(m, ratio, s), expected)


@pytest.mark.parametrize("ratio", [2, 4])
def test_bilinear_tiles_are_the_antialiased_downsampled_images(ratio):
    images = torch.rand(4, 2, 16, 24, dtype=torch.float64)
    m, sources = montage(images, ratio, 4, resize="bilinear", generator=seeded(2))
    assert m.dtype == torch.float64
    small = F.interpolate(
        images,
        size=(16 // ratio, 24 // ratio),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    for s in range(ratio * ratio):
        torch.testing.assert_close(tile(m, ratio, s), small[sources[:, s]], rtol=0, atol=1e-12)
    # a downsample keeps each image's mean (area-correct), here to within the edge clipping
    for s in range(ratio * ratio):
        means = tile(m, ratio, s).mean((-2, -1))
        torch.testing.assert_close(means, images[sources[:, s]].mean((-2, -1)), rtol=0, atol=0.05)


def test_bilinear_uint8_is_rounded_and_stays_uint8():
    images = constant_images(3, 3, 8, 8).to(torch.uint8)
    m, sources = montage(images, 2, 3, resize="bilinear", generator=seeded(3))
    assert m.dtype == torch.uint8
    for s in range(4):
        assert torch.equal(tile(m, 2, s), images[sources[:, s], :, :4, :4])


def test_resize_none_tiles_the_images_as_they_are():
    tiles = torch.rand(9, 3, 5, 7)
    m, sources = montage(tiles, 3, resize=None, generator=seeded(7))
    assert m.shape == (1, 3, 15, 21)
    for s in range(9):
        assert torch.equal(tile(m, 3, s), tiles[sources[:, s]])
    # any size: no divisibility needed
    assert montage(torch.rand(2, 1, 3, 3), 4, resize=None)[0].shape == (1, 1, 12, 12)


def test_montage_is_differentiable():
    images = torch.rand(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    m, sources = montage(images, 2, 3, resize="bilinear", generator=seeded(6))
    m.sum().backward()
    # every downsampled pixel sums 1 unit of input mass per (4 x 4 -> 2 x 2) block: each
    # appearance of an image adds 4 (its 2 x 2 tile's pixels) to its gradient's sum
    appearances = torch.bincount(sources.flatten(), minlength=3).double()
    torch.testing.assert_close(images.grad.sum((1, 2, 3)), 4 * appearances)
    images.grad = None
    m, sources = montage(images, 2, 3, generator=seeded(6))  # nearest: the kept pixels
    m.sum().backward()
    kept = torch.zeros(4, 4, dtype=torch.float64)
    kept[::2, ::2] = 1
    appearances = torch.bincount(sources.flatten(), minlength=3).double()
    torch.testing.assert_close(images.grad, appearances[:, None, None, None] * kept)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ratio", [0, -2, 3, 5, 2.5, True, "2"])
def test_bad_ratio_names_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        montage(torch.rand(2, 3, 8, 12), ratio)


def test_ratio_not_dividing_one_side_says_which_shape():
    with pytest.raises(ValueError, match=r"ratio.*\(2, 3, 12, 10\)"):
        montage(torch.rand(2, 3, 12, 10), 4)


@pytest.mark.parametrize("count", [0, -1, 2.0, True, "3"])
def test_bad_count_names_count(count):
    with pytest.raises(ValueError, match="count"):
        montage(torch.rand(2, 3, 8, 8), 2, count)


@pytest.mark.parametrize("resize", ["area", "Nearest", 1, True])
def test_bad_resize_names_resize(resize):
    with pytest.raises(ValueError, match="resize"):
        montage(torch.rand(2, 3, 8, 8), 2, resize=resize)


@pytest.mark.parametrize(
    "images, error, words",
    [
        (torch.rand(3, 8, 8), ValueError, "images"),
        (torch.rand(0, 3, 8, 8), ValueError, "images"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), TypeError, "dtype"),
        ([[0.0]], TypeError, "images"),
    ],
)
def test_bad_images(images, error, words):
    with pytest.raises(error, match=words):
        montage(images, 2)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        montage(torch.rand(2, 3, 8, 8), 2, generator=0)
