"""The training data stream: two augmented views per image, reproducible sample by sample.

Every sample is named by a *key* ``epoch * len(dataset) + index``: its image is ``index`` and
all of its randomness (crop boxes, flips, photometric ops) comes from a generator seeded with
``stream_seed(seed, key)``. So the stream is a pure function of ``(seed, step)`` whatever the
number of workers, and a run resumed at step ``s`` sees exactly the batches a straight run
sees there.

For MCL, :class:`LevelViews` adds a fresh augmentation of every image per montage level and
view (the released MCL pipeline's), drawn from the same per-sample generator after the two views.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mgc_kernels.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewTransform,
    random_resized_crop_box,
)

from .data import stream_seed


def level_key(view: int, ratio: int) -> str:
    """The batch key of view ``view``'s fresh augmentation for the montage level of ``ratio``."""
    return f"view{view}_r{ratio}"


# (blur probability, solarize probability) of view 1 and view 2: TwoViewTransform's recipe
_LEVEL_RECIPES = ((1.0, 0.0), (0.1, 0.2))
_BLUR_KERNEL, _BLUR_SIGMA = 23, (0.1, 2.0)  # TwoViewTransform's blur at the full view size


class LevelViews:
    """MCL's fresh augmentation per montage level: for every ratio ``r`` (> 1) and view ``v``,
    ``level_key(v, r)`` -> a ``[C, size / r, size / r]`` image, the tile the montage of level
    ``r`` shows (``mk.transforms.montage(..., resize=None)`` tiles them as they are).

    Each is a fresh augmentation of the image, as in the released MCL pipeline (every level's
    montage is made from its own augmented copy), made to give the released tile's pixels at a
    fraction of the cost: a fresh RandomResizedCrop box (``transform``'s scale and aspect ranges,
    no overlap condition with the other views) and flip, the crop resized to the full view size
    (bilinear, antialiased, as the views), every ``r``-th pixel kept (the released nearest
    downsample), then the photometric ops of view ``v``'s recipe at the small size. Colour
    jitter, grayscale and solarize act per pixel, so running them after the subsample gives the
    released pixels (contrast blends towards the mean of the kept pixels instead of all); the
    Gaussian blur runs with its sigma range and kernel divided by ``r``, the small-size equivalent
    of blurring at full size then subsampling (approximately: the subsample aliases). Without
    photometric ops (``TwoViewTransform(photometric=False)``) the tiles keep the input's dtype.

    Cost per image at 224 px and ratios 2 and 7: four crop-resizes at full size (uint8 images
    resize in uint8) plus the photometric ops on 112 and 32 px tiles; measured on one CPU thread
    for a 500 x 375 uint8 image, about half again the two views' augmentation (the colour ops'
    fixed cost on small images dominates), where the released full-size augmentation per level
    would double it or more.
    """

    def __init__(self, transform: TwoViewTransform, ratios: Sequence[int]):
        self.size, self.scale, self.ratio = transform.size, transform.scale, transform.ratio
        self.ratios = tuple(int(r) for r in ratios)
        bad = [r for r in self.ratios if r < 2 or self.size % r]
        if bad:
            raise ValueError(
                f"level ratios must be ints >= 2 dividing the view size "
                f"{self.size}, got {self.ratios}"
            )
        self.pipelines = (
            {r: _level_pipelines(self.size // r, r) for r in self.ratios}
            if transform.photometric
            else None
        )

    def __call__(self, img: Any) -> dict[str, torch.Tensor]:
        img = _as_chw_tensor(img)
        height, width = img.shape[1:]
        out = {}
        for r in self.ratios:
            for view in (1, 2):
                box = random_resized_crop_box(height, width, self.scale, self.ratio)
                flip = bool(torch.rand(()) < 0.5)
                x0, y0, x1, y1 = (int(v) for v in box.tolist())
                # uint8 resizes in uint8 (torch's fixed-point path, like PIL's: about 2x faster
                # than in float, within 1 of float-then-round); others in float32
                crop = img[None, :, y0:y1, x0:x1]
                crop = crop.contiguous() if img.dtype == torch.uint8 else crop.float()
                full = F.interpolate(
                    crop,
                    size=(self.size, self.size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
                # mirror the full-size view, then keep every r-th pixel (the released order)
                tile = (full.flip(-1) if flip else full)[:, ::r, ::r].to(img.dtype)
                if self.pipelines is not None:
                    tile = self.pipelines[r][view - 1](tile.contiguous())
                out[level_key(view, r)] = tile.contiguous()
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, ratios={self.ratios}, "
            f"photometric={self.pipelines is not None})"
        )


def _as_chw_tensor(img: Any) -> torch.Tensor:
    """CHW tensors pass; a PIL image becomes a uint8 RGB tensor."""
    if isinstance(img, torch.Tensor):
        return img
    pil_image = sys.modules.get("PIL.Image")
    if pil_image is not None and isinstance(img, pil_image.Image):
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    raise TypeError(f"img must be a CHW torch.Tensor or a PIL image, got {type(img).__name__}")


def _level_pipelines(size: int, ratio: int) -> tuple[Any, Any]:
    """View 1's and view 2's photometric ops for ``size``-px tiles subsampled by ``ratio``."""
    from torchvision import transforms as T

    kernel = 2 * math.ceil(_BLUR_KERNEL / (2 * ratio)) + 1
    kernel = max(1, min(kernel, size if size % 2 else size - 1))
    sigma = (_BLUR_SIGMA[0] / ratio, _BLUR_SIGMA[1] / ratio)

    def pipeline(blur_p: float, solarize_p: float):
        steps = [
            T.ConvertImageDtype(torch.float32),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=blur_p),
        ]
        if solarize_p > 0:
            steps.append(T.RandomSolarize(0.5, p=solarize_p))
        return T.Compose([*steps, T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    return tuple(pipeline(b, s) for b, s in _LEVEL_RECIPES)


class TwoViews(Dataset):
    """``dataset[index]["image"]`` -> :class:`mgc_kernels.transforms.TwoViewTransform` output,
    with the photometric ops drawn from a generator seeded by the sample's key.

    ``level_ratios`` (MCL's montage ratios above 1) adds :class:`LevelViews`' fresh tiles,
    drawn after the two views from the same seeded generator: the views stay those of a stream
    without them.

    The output also carries ``"bad_images"``: 1 where an image folder replaced a file that does
    not decode (see :class:`mgc_pretrain.data.ImageFolder`), 0 otherwise and for datasets that
    never replace one, so the trainer can count them batch by batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: TwoViewTransform,
        seed: int,
        level_ratios: Sequence[int] = (),
    ):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.levels = LevelViews(transform, level_ratios) if level_ratios else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        item = self.dataset[key % len(self.dataset)]
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
            torch.manual_seed(stream_seed(self.seed, key))
            views = self.transform(item["image"])
            if self.levels is not None:
                views.update(self.levels(item["image"]))
        return {**views, "bad_images": int(item.get("bad_images", 0))}


class KeySampler(Sampler[int]):
    """A :class:`DistributedSampler` (shuffled per epoch, split over ranks, ragged tail
    dropped) that yields sample keys and can start ``skip`` samples into the epoch."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int):
        self.inner = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.size = len(dataset)
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return len(self.inner) - self.skip

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)[self.skip :]
        return iter(self.epoch * self.size + i for i in order)


def batches(
    dataset: Dataset,
    transform: TwoViewTransform,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    workers: int,
    world_size: int = 1,
    rank: int = 0,
    level_ratios: Sequence[int] = (),
) -> Iterator[dict]:
    """Endless stream of collated batches from ``start_step`` on (this rank's share);
    ``level_ratios``: see :class:`TwoViews` (MCL's ``method.level_ratios``)."""
    views = TwoViews(dataset, transform, seed, level_ratios)
    sampler = KeySampler(views, world_size, rank, seed)
    steps = steps_per_epoch(len(dataset), batch_size, world_size)
    if steps == 0:
        raise ValueError(
            f"batch_size={batch_size} per process is larger than the dataset's "
            f"{len(dataset)} images over {world_size} process(es)"
        )
    epoch, step_in_epoch = divmod(start_step, steps)
    while True:
        sampler.start(epoch, step_in_epoch * batch_size)
        # its own generator: creating the iterator must not draw from the global RNG, which
        # the checkpoint restores (drop-path, query boxes, montages draw from it)
        loader = DataLoader(
            views,
            batch_size,
            sampler=sampler,
            num_workers=workers,
            drop_last=True,
            generator=torch.Generator(),
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_stop_signals,
        )
        yield from loader
        epoch, step_in_epoch = epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group, and Slurm or systemd send SIGTERM to every
    process of a job: a worker must not die of them (the trainer would see a dead worker
    instead of the signal). The trainer saves and stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps in one pass over the data (the ragged tail of each epoch is dropped)."""
    return (num_images // world_size) // batch_size
