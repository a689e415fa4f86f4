"""Frozen-backbone evaluation probes: how much a pretrained backbone (timm ViT or CNN) already
knows.

Probes that need no fine-tuning of the backbone; on synthetic scenes they run in seconds on a
CPU:

- a dense linear probe: a linear classifier on each patch token, scored by mIoU against the
  majority class of the mask under that patch (the dense-prediction skill MGC pretrains for);
- a weighted k-NN probe on the global feature (DINO's image-level probe), on synthetic scenes
  or on a labelled image folder (:func:`probe_image_folder`).

Everything is deterministic given the seed, so a trained backbone and a random-init one can be
compared on equal terms.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .data import LabelledImageFolder
from .models import features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TABLE_COLUMNS = (
    ("dense mIoU", "dense_miou"),
    ("patch acc", "dense_patch_acc"),
    ("k-NN top-1", "knn_top1"),
)


def patch_labels(mask: Tensor, grid: int, num_classes: int) -> Tensor:
    """Majority class of each cell of a ``grid x grid`` split of each mask, row-major.

    Patch tokens see a whole cell, so the label a patch should predict is the class covering
    most of it. Areas come from ``adaptive_avg_pool2d`` so mask sizes that ``grid`` does not
    divide still get (overlapping) cells like the resized image would. One class at a time keeps
    memory at one float mask, not ``num_classes`` of them. Ties go to the lowest class.

    Args:
        mask: ``[N, H, W]`` integer class map with values in ``[0, num_classes)``.
    Returns:
        ``[N, grid * grid]`` long labels.
    """
    if mask.dim() != 3 or mask.dtype.is_floating_point:
        raise ValueError(
            f"mask must be an integer tensor [N, H, W], got {mask.dtype} {tuple(mask.shape)}"
        )
    if grid <= 0 or num_classes <= 0:
        raise ValueError(f"grid and num_classes must be positive, got {grid}, {num_classes}")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
        raise ValueError(
            f"mask values must lie in [0, {num_classes}), got "
            f"[{int(mask.min())}, {int(mask.max())}]"
        )
    best_area = torch.full((mask.shape[0], grid * grid), -1.0, device=mask.device)
    best_class = torch.zeros(mask.shape[0], grid * grid, dtype=torch.long, device=mask.device)
    for class_id in range(num_classes):
        area = F.adaptive_avg_pool2d((mask == class_id).float().unsqueeze(1), grid).flatten(1)
        larger = area > best_area
        best_area = torch.where(larger, area, best_area)
        best_class = torch.where(larger, class_id, best_class)
    return best_class


def segmentation_metrics(pred: Tensor, truth: Tensor, num_classes: int) -> dict[str, Any]:
    """Per-class IoU, mIoU and accuracy of label predictions, from the confusion matrix.

    IoU of class c is TP / (TP + FP + FN); a class absent from both prediction and truth has no
    defined IoU (nan) and is left out of the mean rather than counted as 0 or 1.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    pred, truth = pred.reshape(-1).long(), truth.reshape(-1).long()
    confusion = torch.bincount(truth * num_classes + pred, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    true_pos = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_pos
    iou = torch.where(union > 0, true_pos / union.clamp_min(1), torch.nan)
    return {
        "miou": float(iou.nanmean()),
        "iou": iou.tolist(),
        "patch_acc": float(true_pos.sum() / confusion.sum().clamp_min(1)),
    }


def dense_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a linear classifier on per-patch features and score it on the test patches.

    Features are standardised with the train statistics so one learning rate suits any
    backbone's feature scale; training is full-batch AdamW (one step an epoch), which on a
    convex problem is deterministic and converges in a few dozen steps.

    Args:
        train_x, test_x: ``[N, P, C]`` patch features; train_y, test_y: ``[N, P]`` labels.
    Returns:
        ``{"miou", "iou" (per class, nan if absent), "patch_acc"}`` on the test set.
    """
    _check_features(train_x, train_y, "train")
    _check_features(test_x, test_y, "test")
    train_x, test_x = train_x.flatten(0, -2).float(), test_x.flatten(0, -2).float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classifier = _fit_linear(
        train_x,
        train_y.reshape(-1).long(),
        num_classes,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    with torch.inference_mode():
        pred = classifier(test_x).argmax(1)
    return segmentation_metrics(pred, test_y.reshape(-1), num_classes)


def _check_features(features: Tensor, labels: Tensor, split: str) -> None:
    if features.dim() < 2 or features.shape[:-1] != labels.shape:
        raise ValueError(
            f"{split}_x {tuple(features.shape)} must be labels' shape "
            f"{tuple(labels.shape)} plus a feature dimension"
        )


def _fit_linear(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> nn.Linear:
    """Full-batch softmax regression; the seeded initialisation keeps runs reproducible."""
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * 0.01)
        classifier.bias.zero_()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(classifier(features), labels).backward()
        optimizer.step()
        scheduler.step()
    return classifier


def knn_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of DINO's weighted k-NN classifier on image embeddings.

    Each test embedding votes with its k most cosine-similar train embeddings, each vote
    weighted by ``exp(similarity / temperature)``, so close neighbours count far more than far
    ones. ``k`` is clipped to the train-set size.
    """
    if temperature <= 0 or k <= 0:
        raise ValueError(f"k and temperature must be positive, got {k}, {temperature}")
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x {tuple(train_x.shape)} and test_x {tuple(test_x.shape)} "
            "must be [N, C] and [M, C]"
        )
    train_x = F.normalize(train_x.float(), dim=1)
    train_y = train_y.long()
    correct = 0
    for test_chunk, truth_chunk in zip(test_x.split(1024), test_y.split(1024)):
        similarity = F.normalize(test_chunk.float(), dim=1) @ train_x.T
        top_sim, top_idx = similarity.topk(min(k, train_x.shape[0]), dim=1)
        votes = similarity.new_zeros(test_chunk.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == truth_chunk.long()).sum())
    return correct / max(test_x.shape[0], 1)


def extract_features(
    backbone: nn.Module,
    images: Tensor | Iterable,
    *,
    image_size: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Global features and tokens of a timm ViT or CNN for a set of uint8 images.

    Images are preprocessed like the training views (resized to ``image_size``, ImageNet
    normalisation); the backbone runs frozen (see :func:`_frozen`), so probing in the middle of
    training is harmless. What "global" and "tokens" are is :func:`mgc_pretrain.models.features`'
    choice: the CLS and patch tokens of a ViT, the mean and the positions of a CNN's last map.

    Args:
        images: a uint8 ``[N, 3, S, S]`` tensor, or an iterable of such images or of dicts with
            an ``"image"`` entry (a dataset).
        device: where the backbone runs; default the device of its parameters.
    Returns:
        ``(global [N, C], tokens [N, P, C])`` float32 on the CPU.
    """
    device = _device(backbone, device)
    global_parts, token_parts = [], []
    with _frozen(backbone):
        for batch in _image_batches(images, batch_size):
            global_feature, tokens = features(backbone, _preprocess(batch, image_size, device))
            global_parts.append(global_feature.float().cpu())
            token_parts.append(tokens.float().cpu())
    if not global_parts:
        raise ValueError("images is empty")
    return torch.cat(global_parts), torch.cat(token_parts)


def _device(backbone: nn.Module, device: torch.device | str | None) -> torch.device | str:
    return next(backbone.parameters()).device if device is None else device


@contextmanager
def _frozen(backbone: nn.Module) -> Iterator[None]:
    """Eval mode under ``inference_mode``, the previous mode restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        backbone.train(was_training)


def _image_batches(images: Tensor | Iterable, batch_size: int) -> Iterator[Tensor]:
    """Uint8 ``[B, 3, S, S]`` batches from a tensor or from an iterable of images/dicts."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    pending: list[Tensor] = []
    for item in images:
        pending.append(item["image"] if isinstance(item, dict) else item)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def _preprocess(images: Tensor, image_size: int, device: torch.device | str) -> Tensor:
    """uint8 images -> resized, ImageNet-normalised float batch on ``device``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    pixels = images.to(device=device, dtype=torch.float32) / 255.0
    if pixels.shape[-2:] != (image_size, image_size):
        pixels = F.interpolate(
            pixels,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def probe_backbone(
    backbone: nn.Module,
    train_set: Iterable[dict],
    test_set: Iterable[dict],
    *,
    image_size: int,
    grid: int,
    num_classes: int,
    device: torch.device | str | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Dense linear probe (tokens) and k-NN probe (global feature) of a frozen backbone.

    The datasets yield ``{"image": uint8 [3, S, S], "mask": long [S, S], "label": int}``;
    ``grid`` is the backbone's token grid at ``image_size`` (a ViT's patch grid, a CNN's final
    map), and each token's target is the majority mask class under it.

    Returns:
        ``{"dense_miou", "dense_patch_acc", "knn_top1"}`` as fractions in [0, 1].
    """
    train_images, train_patch_y, train_image_y = _collect(train_set, grid, num_classes, batch_size)
    test_images, test_patch_y, test_image_y = _collect(test_set, grid, num_classes, batch_size)
    train_cls, train_patches = extract_features(
        backbone, train_images, image_size=image_size, batch_size=batch_size, device=device
    )
    test_cls, test_patches = extract_features(
        backbone, test_images, image_size=image_size, batch_size=batch_size, device=device
    )
    if train_patches.shape[1] != grid * grid:
        raise ValueError(
            f"backbone gives {train_patches.shape[1]} patch tokens at image_size "
            f"{image_size}, not grid * grid = {grid * grid}"
        )
    dense = dense_linear_probe(
        train_patches, train_patch_y, test_patches, test_patch_y, num_classes
    )
    knn_top1 = knn_probe(train_cls, train_image_y, test_cls, test_image_y, num_classes)
    return {
        "dense_miou": dense["miou"],
        "dense_patch_acc": dense["patch_acc"],
        "knn_top1": knn_top1,
    }


def probe_image_folder(
    backbone: nn.Module,
    root: str | os.PathLike,
    *,
    image_size: int,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    k: int = 20,
    workers: int = 0,
) -> dict[str, float | int]:
    """k-NN top-1 of a frozen backbone's global feature on a labelled image folder.

    ``root`` holds one subfolder per class (ImageNet's layout, see
    :class:`mgc_pretrain.data.LabelledImageFolder`). If it has both a ``train/`` and a ``val/``
    subfolder, each laid out so, the probe fits on train and scores on val; otherwise each
    class of ``root`` is split by :func:`hash_split` (about 80 % fit, 20 % scored). Images are
    resized (shorter side to ``image_size``, antialiased) and centre-cropped to ``image_size``,
    then normalised like :func:`extract_features`; the feature is the global one of
    :func:`mgc_pretrain.models.features` (CLS token of a ViT, mean-pooled last map of a CNN).
    ``workers`` loader processes decode the images. Files that open but do not decode are
    left out of both sides (the dataset's replacement would be a duplicate of another image,
    possibly one of the other side) and counted.

    Returns:
        ``{"knn_top1", "num_train", "num_test", "num_classes", "bad_images"}``: top-1 in
        [0, 1], the counts of images used, and how many files were left out when loaded.
    """
    fit, test, classes = _probe_splits(Path(root))
    device = _device(backbone, device)
    fit_x, fit_y = _folder_features(backbone, fit, image_size, device, batch_size, workers)
    test_x, test_y = _folder_features(backbone, test, image_size, device, batch_size, workers)
    return {
        "knn_top1": knn_probe(fit_x, fit_y, test_x, test_y, len(classes), k=k),
        "num_train": len(fit_y),
        "num_test": len(test_y),
        "num_classes": len(classes),
        "bad_images": len(fit) + len(test) - len(fit_y) - len(test_y),
    }


def hash_split(
    dataset: LabelledImageFolder, test_fraction: float = 0.2
) -> tuple[list[int], list[int]]:
    """Deterministic per-class split of a labelled folder into fit and test indices.

    Within each class the files are ordered by the SHA-1 of their path relative to the
    dataset's root; the first ``round(n * test_fraction)`` of a class of ``n`` go to test, at
    least 1 and at most ``n - 1``, so every class with 2 or more images is on both sides (a class
    with one image is fit only). A file's side depends only on its class's file names, never on
    the machine, the file order or other classes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    per_class: dict[int, list[tuple[bytes, int]]] = {}
    for index, (path, label) in enumerate(zip(dataset.files, dataset.labels)):
        name = path.relative_to(dataset.root).as_posix().encode()
        per_class.setdefault(label, []).append((hashlib.sha1(name).digest(), index))
    fit, test = [], []
    for members in per_class.values():
        order = [index for _, index in sorted(members)]
        num_test = min(max(round(len(order) * test_fraction), 1), len(order) - 1)
        test += order[:num_test]
        fit += order[num_test:]
    return sorted(fit), sorted(test)


def _probe_splits(root: Path) -> tuple[Dataset, Dataset, list[str]]:
    """Fit and test sets of a labelled folder (its train/val layout or :func:`hash_split`)."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        fit = LabelledImageFolder(root / "train")
        return fit, LabelledImageFolder(root / "val", classes=fit.classes), fit.classes
    dataset = LabelledImageFolder(root)
    fit_indices, test_indices = hash_split(dataset)
    if not test_indices:
        raise ValueError(
            f"labelled image folder {str(root)!r} has no class with 2 or more "
            "readable images, so nothing is left to score the probe on"
        )
    return Subset(dataset, fit_indices), Subset(dataset, test_indices), dataset.classes


class _CentreCropped(Dataset):
    """A labelled dataset's images resized (shorter side) and centre-cropped to ``size``."""

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {**item, "image": resize_and_centre_crop(item["image"], self.size)}


def resize_and_centre_crop(image: Tensor, size: int) -> Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``: the shorter side resized to ``size``
    (bilinear, antialiased), then the centre ``size x size`` kept (the usual evaluation view)."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(
        image[None].float(), size=new_size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    crop = resized[:, top : top + size, left : left + size]
    return crop.round_().clamp_(0, 255).to(torch.uint8)


def _folder_features(
    backbone: nn.Module,
    dataset: Dataset,
    image_size: int,
    device: torch.device | str,
    batch_size: int,
    workers: int,
) -> tuple[Tensor, Tensor]:
    """Global features and labels of a labelled dataset's items, replaced ones left out."""
    loader = DataLoader(_CentreCropped(dataset, image_size), batch_size, num_workers=workers)
    parts, labels = [], []
    with _frozen(backbone):
        for batch in loader:
            global_feature, _ = features(backbone, _preprocess(batch["image"], image_size, device))
            decoded = batch["bad_images"] == 0
            parts.append(global_feature[decoded.to(global_feature.device)].float().cpu())
            labels.append(batch["label"][decoded])
    return torch.cat(parts), torch.cat(labels)


def _collect(
    dataset: Iterable[dict], grid: int, num_classes: int, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack a dataset's images, per-patch majority labels and image labels.

    Masks are reduced to patch labels a batch at a time, so full-resolution masks of the whole
    set are never held at once.
    """
    images, patch_y, image_y = [], [], []
    pending: list[dict] = []
    for item in dataset:
        pending.append(item)
        if len(pending) == batch_size:
            _reduce_batch(pending, grid, num_classes, images, patch_y, image_y)
            pending = []
    if pending:
        _reduce_batch(pending, grid, num_classes, images, patch_y, image_y)
    if not images:
        raise ValueError("dataset is empty")
    return torch.cat(images), torch.cat(patch_y), torch.cat(image_y)


def _reduce_batch(
    items: list[dict],
    grid: int,
    num_classes: int,
    images: list[Tensor],
    patch_y: list[Tensor],
    image_y: list[Tensor],
) -> None:
    images.append(torch.stack([item["image"] for item in items]))
    patch_y.append(patch_labels(torch.stack([item["mask"] for item in items]), grid, num_classes))
    image_y.append(torch.tensor([int(item["label"]) for item in items]))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Aligned text table of probe results (percentages, one decimal), one row per model.

    Meant for printing a trained backbone beside a random-init one; a missing or nan value
    shows as ``-``.
    """
    name_width = max([len("model"), *map(len, rows)])
    header = "  ".join(["model".ljust(name_width), *(title for title, _ in _TABLE_COLUMNS)])
    lines = [header, "-" * len(header)]
    for name, results in rows.items():
        cells = [_percent(results.get(key)).rjust(len(title)) for title, key in _TABLE_COLUMNS]
        lines.append("  ".join([name.ljust(name_width), *cells]))
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}"
