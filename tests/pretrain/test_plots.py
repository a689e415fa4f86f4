"""Run figures: PNGs are written where asked, with the expected shape; bad input is refused."""
import importlib

import pytest
import torch

pytest.importorskip("matplotlib")
imread = importlib.import_module("matplotlib.image").imread
plots = importlib.import_module("mgc_pretrain.plots")
plot_correspondences, plot_loss_curve = plots.plot_correspondences, plots.plot_loss_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, width_over_height):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(width_over_height, rel=0.02)
    return pixels


@pytest.mark.parametrize("with_lr", [False, True])
def test_loss_curve_writes_png_and_creates_folder(tmp_path, with_lr):
    steps = list(range(0, 300, 3))
    losses = [5.0 / (1 + step / 50) + 0.1 * (step % 7) for step in steps]
    lrs = [min(1.0, step / 30) * 1e-3 for step in steps] if with_lr else None
    path = tmp_path / "run" / "figures" / "loss.png"
    plot_loss_curve(steps, losses, path, title="MGC", lrs=lrs)
    assert_png(path, 7 / 4)


def test_loss_curve_single_point(tmp_path):
    plot_loss_curve([0], [1.0], tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png", 7 / 4)


@pytest.mark.parametrize("steps, losses, lrs", [([0, 1], [1.0], None), ([], [], None),
                                                ([0, 1], [1.0, 0.5], [0.1])])
def test_loss_curve_rejects_mismatched_lengths(tmp_path, steps, losses, lrs):
    with pytest.raises(ValueError):
        plot_loss_curve(steps, losses, tmp_path / "loss.png", lrs=lrs)


def pairs(weights):
    count = len(weights)
    return torch.arange(count), torch.arange(count).flip(0), torch.tensor(weights)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_correspondences_writes_png(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        views = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, generator=generator)
    else:
        views = torch.randn(2, 3, 56, 56, generator=generator)
    idx1, idx2, weight = pairs([1.0, 0.5, 0.25, 0.0])
    path = tmp_path / "figures" / "pairs.png"
    plot_correspondences(views[0], views[1], idx1, idx2, weight, grid=14, cell=7, path=path,
                         title="c = 7")
    assert_png(path, 8 / 4.4)


def test_zero_weight_pairs_are_not_drawn(tmp_path):
    view = torch.full((3, 28, 28), 128, dtype=torch.uint8)
    empty = torch.zeros(0, dtype=torch.long)
    plot_correspondences(view, view, empty, empty, torch.zeros(0), grid=4, cell=1,
                         path=tmp_path / "none.png")
    plot_correspondences(view, view, *pairs([0.0, 0.0]), grid=4, cell=1,
                         path=tmp_path / "padding.png")
    plot_correspondences(view, view, *pairs([1.0, 0.0]), grid=4, cell=1,
                         path=tmp_path / "one.png")
    none = imread(tmp_path / "none.png")
    assert (imread(tmp_path / "padding.png") == none).all()
    assert not (imread(tmp_path / "one.png") == none).all()


@pytest.mark.parametrize("grid, cell, idx1, idx2, weight, message", [
    (14, 3, [0], [0], [1.0], "divisor"),
    (14, 0, [0], [0], [1.0], "divisor"),
    (14, 7, [0, 1], [0], [1.0], "equal length"),
    (14, 7, [0], [0], [1.0, 1.0], "equal length"),
    (14, 7, [4], [0], [1.0], "idx1"),
    (14, 7, [0], [-1], [1.0], "idx2"),
    (14, 7, [0], [0], [-1.0], "non-negative"),
])
def test_correspondences_rejects_bad_input(tmp_path, grid, cell, idx1, idx2, weight, message):
    view = torch.zeros(3, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        plot_correspondences(view, view, torch.tensor(idx1), torch.tensor(idx2),
                             torch.tensor(weight), grid=grid, cell=cell,
                             path=tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_correspondences_rejects_bad_view(tmp_path):
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        plot_correspondences(torch.zeros(28, 28), torch.zeros(3, 28, 28), *pairs([1.0]),
                             grid=2, cell=1, path=tmp_path / "bad.png")
