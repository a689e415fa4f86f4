"""Run figures: PNGs are written where asked; every method's figure shows what that method
computes (flips marked, shared regions nested, DenseCL's matches, ADCLR's crops)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("matplotlib")
pytest.importorskip("timm")
imread = importlib.import_module("matplotlib.image").imread
Figure = importlib.import_module("matplotlib.figure").Figure
Rectangle = importlib.import_module("matplotlib.patches").Rectangle
plots = importlib.import_module("mgc_pretrain.plots")
figures = importlib.import_module("mgc_pretrain.figures")

import mgc_kernels as mk  # noqa: E402
from _micro import MICRO  # noqa: E402
from mgc_kernels.transforms import TwoViewTransform  # noqa: E402
from mgc_pretrain.data import SyntheticScenes  # noqa: E402
from mgc_pretrain.loader import TwoViews  # noqa: E402
from mgc_pretrain.methods import PRETRAIN_METHODS, query_boxes  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = {
    "mgc": {},
    "densecl": dict(queue_size=64),
    "mcl": {},
    "smog": dict(num_groups=8, bank_size=32),
    "adclr": dict(num_prototypes=32, num_queries=3),
}


def assert_png(path, width_over_height=None):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    if width_over_height is not None:
        assert pixels.shape[1] / pixels.shape[0] == pytest.approx(width_over_height, rel=0.02)
    return pixels


@pytest.fixture(scope="module")
def batch():
    views = TwoViews(SyntheticScenes(8, 64, 0), TwoViewTransform(MICRO.img_size), 0)
    return torch.utils.data.default_collate([views[i] for i in range(8)])


def method(name):
    torch.manual_seed(0)
    return PRETRAIN_METHODS[name](MICRO, 0.0, **SMALL[name])


def with_flips(batch, flip1, flip2):
    return {**batch, "flip1": torch.full((8,), flip1), "flip2": torch.full((8,), flip2)}


@pytest.mark.parametrize("with_lr", [False, True])
def test_loss_curve_writes_png_and_creates_folder(tmp_path, with_lr):
    steps = list(range(0, 300, 3))
    losses = [5.0 / (1 + step / 50) + 0.1 * (step % 7) for step in steps]
    lrs = [min(1.0, step / 30) * 1e-3 for step in steps] if with_lr else None
    path = tmp_path / "run" / "figures" / "loss.png"
    plots.plot_loss_curve(steps, losses, path, title="MGC", lrs=lrs)
    assert_png(path, 7 / 4)


def test_loss_curve_single_point(tmp_path):
    plots.plot_loss_curve([0], [1.0], tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png", 7 / 4)


@pytest.mark.parametrize(
    "steps, losses, lrs", [([0, 1], [1.0], None), ([], [], None), ([0, 1], [1.0, 0.5], [0.1])]
)
def test_loss_curve_rejects_mismatched_lengths(tmp_path, steps, losses, lrs):
    with pytest.raises(ValueError):
        plots.plot_loss_curve(steps, losses, tmp_path / "loss.png", lrs=lrs)


@pytest.mark.parametrize("name", sorted(PRETRAIN_METHODS))
def test_every_method_writes_its_figure(tmp_path, batch, name):
    model = method(name).train()
    rng = torch.get_rng_state()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "run" / "correspondences.png"
    figures.draw_method_figure(model, batch, path, title_prefix="run 1: ")
    pixels = assert_png(path)
    assert min(pixels.shape[:2]) > 300 and path.stat().st_size > 50_000
    assert pixels[..., :3].std() > 0.1  # an image, not a blank canvas
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unknown_method_is_refused(tmp_path, batch):
    with pytest.raises(TypeError, match="no figure"):
        figures.draw_method_figure(torch.nn.Linear(1, 1), batch, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "flip1, flip2", [(False, False), (True, False), (False, True), (True, True)]
)
def test_panels_mark_the_flipped_views(batch, flip1, flip2):
    figure, axes = figures.two_views(with_flips(batch, flip1, flip2), "MGC", "caption")
    for panel, flipped in zip(axes, (flip1, flip2)):
        assert (plots.flip_label(True) in panel.get_title()) == flipped
        assert (panel.title.get_color() == plots.FLIP_COLOUR) == flipped
        assert (
            panel.spines["top"].get_edgecolor()[:3]
            == importlib.import_module("matplotlib.colors").to_rgb(plots.FLIP_COLOUR)
        ) == flipped
    summary = figure.get_suptitle()
    assert ("view 1" in summary) == flip1 and ("view 2" in summary) == flip2
    assert ("no view flipped" in summary) == (not flip1 and not flip2)


def test_flip_label_says_which():
    assert "FLIPPED" in plots.flip_label(True) and "FLIPPED" not in plots.flip_label(False)


def test_shared_regions_nest_with_distinct_colours():
    assert plots.nest_depths([5, 5, 7, 5, 7, 1]) == [0, 1, 0, 2, 1, 0]
    rect = (16.0, 32.0, 32.0, 48.0)
    axes = Figure().add_subplot()
    palette = plots.colours(4)
    drawn = plots.outline_all(
        axes, [rect] * 3 + [(0, 0, 16, 16)], [9, 9, 9, 2], palette, list("abcd"), step=2.0
    )
    assert drawn[0] == rect and drawn[3] == (0, 0, 16, 16)
    for outer, inner in zip(drawn, drawn[1:3]):  # strictly inside one another
        assert inner[0] > outer[0] and inner[1] > outer[1]
        assert inner[2] < outer[2] and inner[3] < outer[3]
    assert len(set(palette)) == 4 and len(set(plots.colours(10))) == 10
    tags = [text.get_position() for text in axes.texts]
    assert len(set(tags)) == 4  # nested tags sit at other corners
    assert plots.inset(rect, 50, 2.0) == (22.0, 38.0, 26.0, 42.0)  # never below a quarter


def test_mgc_draws_the_pairs_the_loss_samples(batch):
    model = method("mgc")
    cell, idx1, idx2, weight = figures.mgc_pairs(model, batch)
    pairs = mk.sample_pairs(
        batch["box1"][:1],
        batch["flip1"][:1],
        batch["box2"][:1],
        batch["flip2"][:1],
        MICRO.grid,
        2,
        10,
    )
    keep = pairs.weight[0] > 0
    assert cell == 2 and keep.any()
    assert torch.equal(idx1, pairs.idx1[0][keep]) and torch.equal(idx2, pairs.idx2[0][keep])
    assert torch.equal(weight, pairs.weight[0][keep])


def test_densecl_matches_are_the_cosine_argmax(batch):
    model = method("densecl").eval()
    with torch.no_grad():
        matches = figures.densecl_matches(model, batch, index=1)
        f1 = model.backbone.forward_features(batch["view1"][1:2])[0, 1:]
        f2 = model.momentum_backbone.forward_features(batch["view2"][1:2])[0, 1:]
    expected = (F.normalize(f1, dim=1) @ F.normalize(f2, dim=1).T).argmax(1)
    assert matches.shape == (MICRO.grid**2,) and torch.equal(matches, expected)


def test_densecl_queries_lie_where_both_views_overlap(batch):
    queries = figures.spread_queries(batch, MICRO.grid)
    assert len(queries) == 9 and len(set(queries)) == 9
    box1, box2 = batch["box1"][0], batch["box2"][0]
    lo, hi = torch.maximum(box1[:2], box2[:2]), torch.minimum(box1[2:], box2[2:])
    tokens = mk.region_boxes(batch["box1"][:1], batch["flip1"][:1], MICRO.grid, 1)[0, queries]
    centres = (tokens[:, :2] + tokens[:, 2:]) / 2
    assert ((centres > lo - 1) & (centres < hi + 1)).all()  # within a token's reach


@pytest.mark.parametrize("flip1, flip2", [(False, True), (True, False)])
def test_adclr_draws_the_query_crops_mapped_into_each_view(batch, flip1, flip2):
    batch = with_flips(batch, flip1, flip2)
    model = method("adclr")
    torch.manual_seed(figures.SEED)
    regions = query_boxes(batch["box1"][:1], batch["box2"][:1], model.num_queries)[0]
    figure = figures.adclr_figure(model, batch)
    size = MICRO.img_size
    for panel, view, flipped in zip(figure.axes, (1, 2), (flip1, flip2)):
        x0, y0, x1, y1 = batch[f"box{view}"][0].tolist()
        xs = (regions[:, [0, 2]] - x0) / (x1 - x0) * size
        ys = (regions[:, [1, 3]] - y0) / (y1 - y0) * size
        if flipped:
            xs = size - xs.flip(1)
        expected = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)
        drawn = torch.tensor(
            [
                [r.get_x(), r.get_y(), r.get_x() + r.get_width(), r.get_y() + r.get_height()]
                for r in panel.patches
                if isinstance(r, Rectangle)
            ]
        )
        torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-3)
