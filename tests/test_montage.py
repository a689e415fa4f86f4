"""Tests of mgc_kernels.transforms.montage: MCL's r x r tiling of downsampled batch images."""

import pytest
import torch
import torch.nn.functional as F

from mgc_kernels.transforms import montage


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def constant_images(batch, channels, height, width):
    """Image b is one colour: channel c holds 10 * c + b (distinct for every image)."""
    colours = torch.arange(channels)[None, :] * 10.0 + torch.arange(batch)[:, None]
    return colours[:, :, None, None].expand(batch, channels, height, width).clone()


def tile(m, ratio, s):
    """Slot s (row-major) of montages m [B, C, H, W]."""
    h, w = m.shape[2] // ratio, m.shape[3] // ratio
    row, col = divmod(s, ratio)
    return m[:, :, row * h:(row + 1) * h, col * w:(col + 1) * w]


@pytest.mark.parametrize("ratio, height, width", [(2, 8, 8), (3, 12, 6), (7, 14, 28), (4, 16, 8)])
def test_shapes_and_sources(ratio, height, width):
    images = torch.rand(5, 3, height, width)
    m, sources = montage(images, ratio, generator=seeded(0))
    assert m.shape == images.shape and m.dtype == images.dtype
    assert sources.shape == (5, ratio * ratio) and sources.dtype == torch.long
    assert ((sources >= 0) & (sources < 5)).all()
    # one permutation of the batch per slot: every image once in every slot position
    for s in range(ratio * ratio):
        assert sorted(sources[:, s].tolist()) == list(range(5))


@pytest.mark.parametrize("ratio", [2, 3, 7])
def test_constant_colour_tiles_show_their_source(ratio):
    images = constant_images(6, 3, 7 * ratio, 14 * ratio)
    m, sources = montage(images, ratio, generator=seeded(1))
    for s in range(ratio * ratio):
        expected = images[sources[:, s], :, :1, :1].expand_as(tile(m, ratio, s))
        torch.testing.assert_close(tile(m, ratio, s), expected)


@pytest.mark.parametrize("ratio", [2, 4])
def test_tiles_are_the_downsampled_source_images(ratio):
    images = torch.rand(4, 2, 16, 24, dtype=torch.float64)
    m, sources = montage(images, ratio, generator=seeded(2))
    assert m.dtype == torch.float64
    small = F.interpolate(images, size=(16 // ratio, 24 // ratio), mode="bilinear",
                          align_corners=False, antialias=True)
    for s in range(ratio * ratio):
        torch.testing.assert_close(tile(m, ratio, s), small[sources[:, s]], rtol=0, atol=1e-12)
    # a downsample keeps each image's mean (area-correct), here to within the edge clipping
    for s in range(ratio * ratio):
        means = tile(m, ratio, s).mean((-2, -1))
        torch.testing.assert_close(means, images[sources[:, s]].mean((-2, -1)), rtol=0, atol=0.05)


def test_uint8_images_stay_uint8():
    images = constant_images(3, 3, 8, 8).to(torch.uint8)
    m, sources = montage(images, 2, generator=seeded(3))
    assert m.dtype == torch.uint8
    for s in range(4):
        assert torch.equal(tile(m, 2, s), images[sources[:, s], :, :4, :4])


def test_ratio_one_is_the_identity():
    images = torch.rand(4, 3, 10, 6)
    m, sources = montage(images, 1, generator=seeded(4))
    assert torch.equal(m, images) and m.data_ptr() != images.data_ptr()
    assert torch.equal(sources, torch.arange(4)[:, None])


def test_reproducible_with_a_seed():
    images = torch.rand(8, 3, 14, 14)
    a, b = (montage(images, 7, generator=seeded(5)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(montage(images, 2, generator=seeded(s))[1].flatten().tolist()) for s in range(5)}
    assert len(draws) > 1


def test_montage_is_differentiable():
    images = torch.rand(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    m, _ = montage(images, 2, generator=seeded(6))
    m.sum().backward()
    # each image appears in 4 slots across the batch and every downsampled pixel sums to 1
    # unit of input mass per (4 x 4 -> 2 x 2) block: total gradient = 4 slots * 4 pixels
    torch.testing.assert_close(images.grad.sum((1, 2, 3)), torch.full((3,), 16.0, dtype=torch.float64))


@pytest.mark.parametrize("ratio", [0, -2, 3, 5, 2.5, True, "2"])
def test_bad_ratio_names_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        montage(torch.rand(2, 3, 8, 12), ratio)


def test_ratio_not_dividing_one_side_says_which_shape():
    with pytest.raises(ValueError, match=r"ratio.*\(2, 3, 12, 10\)"):
        montage(torch.rand(2, 3, 12, 10), 4)


@pytest.mark.parametrize("images, error, words", [
    (torch.rand(3, 8, 8), ValueError, "images"),
    (torch.rand(0, 3, 8, 8), ValueError, "images"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int32), TypeError, "dtype"),
    ([[0.0]], TypeError, "images"),
])
def test_bad_images(images, error, words):
    with pytest.raises(error, match=words):
        montage(images, 2)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        montage(torch.rand(2, 3, 8, 8), 2, generator=0)
