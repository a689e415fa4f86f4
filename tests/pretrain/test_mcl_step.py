"""The trainer's MCL step at the released cost: the images its encoder sees, the data loader's
fresh augmentation per level, and that montages come from the plain views without it."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("timm")

from _micro import MICRO, micro_config  # noqa: E402
from mgc_kernels.transforms import TwoViewTransform  # noqa: E402
from mgc_pretrain.data import SyntheticScenes  # noqa: E402
from mgc_pretrain.loader import LevelViews, TwoViews, batches, level_key  # noqa: E402
from mgc_pretrain.methods import MCL  # noqa: E402
from mgc_pretrain.train import Trainer  # noqa: E402


def images_per_view(batch: int, ratios) -> int:
    """The design: level r has ceil(B / r**2) montages (each image at least once)."""
    return sum(math.ceil(batch / r**2) for r in ratios)


def count_images(backbone: torch.nn.Module) -> list[int]:
    """Wrap ``backbone.forward_features`` (what every token read goes through) to record the
    number of images of each call."""
    calls, forward = [], backbone.forward_features

    def counted(x):
        calls.append(len(x))
        return forward(x)

    backbone.forward_features = counted
    return calls


def level_batch(size: int = 8, seed: int = 0, ratios=(2, 7)) -> dict:
    views = TwoViews(
        SyntheticScenes(size, 64, 0), TwoViewTransform(MICRO.img_size), seed, level_ratios=ratios
    )
    return torch.utils.data.default_collate([views[i] for i in range(size)])


def test_the_trainer_step_feeds_the_encoder_about_1_27_b_images_per_view(tmp_path):
    trainer = Trainer(micro_config(tmp_path, method="mcl", steps=1))
    method, batch = trainer.method, trainer.cfg.batch_size
    assert method.criterion.ratios == (1, 2, 7) and batch == 8
    online, momentum = count_images(method.backbone), count_images(method.momentum_backbone)
    trainer.fit()
    per_view = images_per_view(batch, (1, 2, 7))
    assert per_view == 8 + 2 + 1
    assert online == [per_view, per_view]  # one forward per view, all levels together
    assert momentum == [batch, batch]  # the keys: the plain views only
    # at the released batch size: B + B/4 + B/49, rounded up per level, about 1.27 B
    assert images_per_view(256, (1, 2, 7)) == 256 + 64 + 6 == 326
    assert 326 / 256 == pytest.approx(1.27, abs=0.005)


@pytest.mark.parametrize("size", [5, 50])
def test_montages_per_level_are_ceil_b_over_r_squared(size):
    torch.manual_seed(0)
    method = MCL(MICRO, 0.0)
    batch = {"view1": torch.rand(size, 3, 56, 56), "view2": torch.rand(size, 3, 56, 56)}
    for view in (1, 2):
        images, sources = method.montages(batch, view)
        assert len(images) == images_per_view(size, (1, 2, 7))
        assert [tuple(s.shape) for s in sources] == [
            (math.ceil(size / r**2), r * r) for r in (1, 2, 7)
        ]
        for s in sources:  # every image in every level
            assert set(s.flatten().tolist()) == set(range(size))


def test_without_level_views_the_montages_subsample_the_plain_view():
    torch.manual_seed(1)
    method = MCL(MICRO, 0.0)
    plain = torch.rand(6, 3, 56, 56)
    images, sources = method.montages({"view1": plain}, 1)
    assert torch.equal(images[:6], plain) and torch.equal(sources[0][:, 0], torch.arange(6))
    two = images[6:8]  # ratio 2: 2 montages of 28 px
    for slot in range(4):
        row, col = divmod(slot, 2)
        tile = two[:, :, 28 * row : 28 * (row + 1), 28 * col : 28 * (col + 1)]
        assert torch.equal(tile, plain[sources[1][:, slot], :, ::2, ::2])


def test_with_level_views_the_montages_tile_the_fresh_augmentations():
    batch = level_batch()
    assert batch[level_key(1, 2)].shape == (8, 3, 28, 28)
    assert batch[level_key(2, 7)].shape == (8, 3, 8, 8)
    torch.manual_seed(2)
    method = MCL(MICRO, 0.0)
    images, sources = method.montages(batch, 2)
    assert len(images) == 8 + 2 + 1
    seven = images[10]  # ratio 7: one montage
    for slot in range(49):
        row, col = divmod(slot, 7)
        tile = seven[:, 8 * row : 8 * (row + 1), 8 * col : 8 * (col + 1)]
        assert torch.equal(tile, batch[level_key(2, 7)][sources[2][0, slot]])
    # fresh: not the plain view subsampled
    assert not torch.allclose(batch[level_key(2, 7)], batch["view2"][:, :, ::7, ::7])
    loss, _ = method(batch, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and method.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_level_views_are_a_function_of_seed_and_key_and_leave_the_views_alone():
    scenes, transform = SyntheticScenes(8, 64), TwoViewTransform(56)
    plain = TwoViews(scenes, transform, 0)[11]
    with_levels, again = (TwoViews(scenes, transform, 0, (2, 7))[11] for _ in range(2))
    assert all(
        torch.equal(torch.as_tensor(with_levels[k]), torch.as_tensor(again[k])) for k in with_levels
    )
    assert all(
        torch.equal(torch.as_tensor(plain[k]), torch.as_tensor(with_levels[k])) for k in plain
    )  # drawn after the views
    other = TwoViews(scenes, transform, 1, (2, 7))[11]
    assert not torch.equal(with_levels[level_key(1, 2)], other[level_key(1, 2)])
    # four fresh augmentations: no two alike
    tiles = [with_levels[level_key(v, 2)] for v in (1, 2)]
    assert not torch.equal(tiles[0], tiles[1])


def test_level_views_without_photometric_ops_are_every_r_th_pixel_of_a_fresh_crop():
    # photometric=False: each tile is the crop resized to the full view size, subsampled
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    levels = LevelViews(TwoViewTransform(56, photometric=False), (2, 7))
    torch.manual_seed(3)
    out = levels(image)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "view1_r2": (3, 28, 28),
        "view2_r2": (3, 28, 28),
        "view1_r7": (3, 8, 8),
        "view2_r7": (3, 8, 8),
    }
    assert all(v.dtype == torch.uint8 for v in out.values())
    with pytest.raises(ValueError, match="level ratios"):
        LevelViews(TwoViewTransform(56), (3,))


def test_the_stream_with_level_views_resumes_at_any_step():
    scenes, transform = SyntheticScenes(16, 64), TwoViewTransform(56)
    options = dict(batch_size=4, seed=0, workers=0, level_ratios=(2, 7))
    straight = batches(scenes, transform, start_step=0, **options)
    next(straight)
    second = next(straight)
    resumed = next(batches(scenes, transform, start_step=1, **options))
    assert second.keys() == resumed.keys() and level_key(2, 7) in second
    assert all(torch.equal(second[k], resumed[k]) for k in second if torch.is_tensor(second[k]))


def test_resume_with_level_views_is_bit_exact(tmp_path, monkeypatch):
    """The trainer's stream with the loader's level views (``batches(...,
    level_ratios=method.level_ratios)``): N steps straight == N/2, resume, N/2 more."""
    import mgc_pretrain.train as train

    seen = []

    def with_levels(*args, **kwargs):
        kwargs.setdefault("level_ratios", (2, 7))
        seen.append(kwargs["level_ratios"])
        return batches(*args, **kwargs)

    monkeypatch.setattr(train, "batches", with_levels)
    options = dict(method="mcl", steps=4, save_every=100)
    Trainer(micro_config(tmp_path / "straight", **options)).fit()
    Trainer(micro_config(tmp_path / "split", **options)).fit(until=2)
    torch.manual_seed(12345)  # the resumed run must take its RNG state from the checkpoint
    Trainer(micro_config(tmp_path / "split", **options, resume="auto", workers=1)).fit()
    assert seen and all(tuple(r) == (2, 7) for r in seen)
    straight, split = (
        torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "split")
    )
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
