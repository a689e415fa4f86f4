"""The training data stream: two augmented views per image, reproducible sample by sample.

Every sample is named by a *key* ``epoch * len(dataset) + index``: its image is ``index`` and
all of its randomness (crop boxes, flips, photometric ops) comes from a generator seeded with
``stream_seed(seed, key)``. So the stream is a pure function of ``(seed, step)`` whatever the
number of workers, and a run resumed at step ``s`` sees exactly the batches a straight run
sees there.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mgc_kernels.transforms import TwoViewTransform

from .data import stream_seed


class TwoViews(Dataset):
    """``dataset[index]["image"]`` -> :class:`mgc_kernels.transforms.TwoViewTransform` output,
    with the photometric ops drawn from a generator seeded by the sample's key.

    The output also carries ``"bad_images"``: 1 where an image folder replaced a file that does
    not decode (see :class:`mgc_pretrain.data.ImageFolder`), 0 otherwise and for datasets that
    never replace one, so the trainer can count them batch by batch.
    """

    def __init__(self, dataset: Dataset, transform: TwoViewTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        item = self.dataset[key % len(self.dataset)]
        with torch.random.fork_rng(devices=[]):   # torchvision draws from the global RNG
            torch.manual_seed(stream_seed(self.seed, key))
            views = self.transform(item["image"])
        return {**views, "bad_images": int(item.get("bad_images", 0))}


class KeySampler(Sampler[int]):
    """A :class:`DistributedSampler` (shuffled per epoch, split over ranks, ragged tail
    dropped) that yields sample keys and can start ``skip`` samples into the epoch."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                        shuffle=True, seed=seed, drop_last=True)
        self.size = len(dataset)
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return len(self.inner) - self.skip

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)[self.skip:]
        return iter(self.epoch * self.size + i for i in order)


def batches(dataset: Dataset, transform: TwoViewTransform, *, batch_size: int, seed: int,
            start_step: int, workers: int, world_size: int = 1, rank: int = 0) -> Iterator[dict]:
    """Endless stream of collated batches from ``start_step`` on (this rank's share)."""
    views = TwoViews(dataset, transform, seed)
    sampler = KeySampler(views, world_size, rank, seed)
    steps = steps_per_epoch(len(dataset), batch_size, world_size)
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} per process is larger than the dataset's "
                         f"{len(dataset)} images over {world_size} process(es)")
    epoch, step_in_epoch = divmod(start_step, steps)
    while True:
        sampler.start(epoch, step_in_epoch * batch_size)
        # its own generator: creating the iterator must not draw from the global RNG, which
        # the checkpoint restores (drop-path, query boxes, montages draw from it)
        loader = DataLoader(views, batch_size, sampler=sampler, num_workers=workers,
                            drop_last=True, generator=torch.Generator(),
                            persistent_workers=False, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_ignore_stop_signals)
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
