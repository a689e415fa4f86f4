"""Two-view augmentation for multi-grained contrast that reports where each view came from.

Multi-grained and dense contrastive losses match regions of one view with regions of the other,
so the data pipeline must hand over, with each view, its crop box in source-image pixels and
whether it was flipped. torchvision's ``RandomResizedCrop`` throws that information away; this
module draws the crops itself and returns it.

The recipe is the official MGC one (docs/methods.md §1.1): RandomResizedCrop boxes, view 2
re-drawn until its IoU with view 1 is above ``min_iou``, a horizontal flip per view after
cropping, then the photometric ops. Boxes are ``(x0, y0, x1, y1)`` with integer coordinates in
source pixels, ``x1``/``y1`` exclusive, so ``x1 - x0`` is the crop's width.

The geometric part needs only torch (CHW tensors) or PIL (PIL images); the photometric part needs
torchvision, which is imported only when a transform that uses it is built.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks

__all__ = ["random_resized_crop_box", "box_iou", "sample_view_boxes", "TwoViewTransform", "montage"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CROP_TRIES = 10  # RandomResizedCrop's tries before its central-crop fallback
_BLUR_KERNEL = 23  # odd, covers +-5.5 sigma at sigma 2: close to an untruncated Gaussian
# (blur probability, solarize probability) of view 1 and view 2 in the official recipe.
_VIEW_RECIPES = ((1.0, 0.0), (0.1, 0.2))


# --- argument checks -------------------------------------------------------------------------


def _min_iou(value: Any) -> float:
    """min_iou lives in [0, 1): the overlap test is strict, so 1 could never be met."""
    return _checks.real("min_iou", value, 0, 1, high_open=True)


def _cpu_generator(generator: Any) -> torch.Generator | None:
    """All draws are small CPU scalars, so only a CPU generator (or None) makes sense."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    return generator


# --- boxes -----------------------------------------------------------------------------------


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def _random_crop_size(height, width, scale, ratio, generator) -> tuple[int, int] | None:
    """(h, w) of a crop with area fraction in scale and log-uniform aspect in ratio, or None
    when _CROP_TRIES draws all fall outside the image."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    return None


def _central_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """The whole image, trimmed along its long side when its aspect is outside ratio."""
    aspect = width / height
    if aspect < ratio[0]:
        return min(height, max(1, round(width / ratio[0]))), width
    if aspect > ratio[1]:
        return height, min(width, max(1, round(height * ratio[1])))
    return height, width


def _draw_box(height, width, scale, ratio, generator) -> tuple[int, int, int, int]:
    """One RandomResizedCrop box as integers (x0, y0, x1, y1)."""
    size = _random_crop_size(height, width, scale, ratio, generator)
    if size is None:
        h, w = _central_crop_size(height, width, ratio)
        y0, x0 = (height - h) // 2, (width - w) // 2
    else:
        h, w = size
        y0 = _randint(height - h + 1, generator)
        x0 = _randint(width - w + 1, generator)
    return x0, y0, x0 + w, y0 + h


def _as_box_tensor(box: tuple[int, int, int, int]) -> Tensor:
    return torch.tensor(box, dtype=torch.float32)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw a RandomResizedCrop box for a ``height x width`` image.

    The crop's area is a uniform fraction of the image area in ``scale`` and its aspect
    (width / height) is log-uniform in ``ratio``; sides are rounded to whole pixels and the
    position is uniform. After 10 draws that do not fit, the fallback is a centred crop of the
    whole image, trimmed along its long side to bring its aspect into ``ratio``.

    Returns a float32 tensor ``[4]``, ``(x0, y0, x1, y1)``, with integer values inside the image.
    ``generator`` (a CPU ``torch.Generator``) makes the draw reproducible; None uses torch's
    global RNG.
    """
    height, width = _checks.integer("height", height, 1), _checks.integer("width", width, 1)
    scale, ratio = _checks.positive_range("scale", scale), _checks.positive_range("ratio", ratio)
    generator = _cpu_generator(generator)
    return _as_box_tensor(_draw_box(height, width, scale, ratio, generator))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of ``(x0, y0, x1, y1)`` boxes, broadcasting over leading dims.

    ``a [..., 4]`` and ``b [..., 4]`` give ``[...]``. Integer boxes are promoted to float32;
    floating boxes keep their dtype. Two zero-area boxes give NaN (their IoU is undefined).
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    for name, box in (("a", a), ("b", b)):
        if box.ndim == 0 or box.shape[-1] != 4:
            raise ValueError(f"box_iou: {name} must have shape [..., 4], got {tuple(box.shape)}")
    if not a.is_floating_point():
        a = a.float()
    if not b.is_floating_point():
        b = b.float()
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    intersection = (bottom_right - top_left).clamp_min(0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    return intersection / (area_a + area_b - intersection)


def _draw_view_boxes(height, width, scale, ratio, min_iou, max_tries, generator):
    """Integer boxes of both views; the arguments are already checked."""
    box1 = _draw_box(height, width, scale, ratio, generator)
    reference = torch.tensor(box1, dtype=torch.float64)  # float64: exact for the strict test
    for _ in range(max_tries):
        box2 = _draw_box(height, width, scale, ratio, generator)
        if box_iou(reference, torch.tensor(box2, dtype=torch.float64)) > min_iou:
            return box1, box2
    return box1, (0, 0, width, height)


def sample_view_boxes(
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    min_iou: float = 0.2,
    max_tries: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Crop boxes of MGC's two views: view 2 must overlap view 1 so that regions correspond.

    View 1 is one :func:`random_resized_crop_box`. View 2 is re-drawn from the same distribution
    until ``box_iou(box1, box2) > min_iou`` (strictly), at most ``max_tries`` times.

    Fallback: when no draw qualifies, view 2 is the whole image ``(0, 0, width, height)``, as in
    the released MGC code. It always contains view 1, but its IoU with view 1 is
    ``area(box1) / (height * width)``, which can be ``<= min_iou``. With the default ranges a
    qualifying draw is found within a few tries; the fallback matters for extreme settings.

    Returns ``(box1, box2)``, float32 tensors ``[4]`` as ``(x0, y0, x1, y1)`` in pixels.
    """
    height, width = _checks.integer("height", height, 1), _checks.integer("width", width, 1)
    scale, ratio = _checks.positive_range("scale", scale), _checks.positive_range("ratio", ratio)
    min_iou = _min_iou(min_iou)
    max_tries = _checks.integer("max_tries", max_tries, 1)
    generator = _cpu_generator(generator)
    box1, box2 = _draw_view_boxes(height, width, scale, ratio, min_iou, max_tries, generator)
    return _as_box_tensor(box1), _as_box_tensor(box2)


# --- images ----------------------------------------------------------------------------------


def _is_pil(img: Any) -> bool:
    """True for PIL images, without importing PIL: a PIL image exists only if PIL is loaded."""
    pil_image = sys.modules.get("PIL.Image")
    return pil_image is not None and isinstance(img, pil_image.Image)


def _image_size(img: Any) -> tuple[int, int]:
    """(height, width) of a CHW uint8/floating tensor or a PIL image, rejecting anything else."""
    if isinstance(img, Tensor):
        if img.ndim != 3:
            raise ValueError(f"img must be a CHW tensor with 3 dims, got shape {tuple(img.shape)}")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise TypeError(f"img must be a uint8 or floating tensor, got dtype {img.dtype}")
        if img.numel() == 0:
            raise ValueError(f"img must not be empty, got shape {tuple(img.shape)}")
        return img.shape[1], img.shape[2]
    if _is_pil(img):
        width, height = img.size
        if width == 0 or height == 0:
            raise ValueError(f"img must not be empty, got a PIL image of size {img.size}")
        return height, width
    raise TypeError(f"img must be a CHW torch.Tensor or a PIL image, got {type(img).__name__}")


def _crop_resize_flip(img: Any, box: tuple[int, int, int, int], size: int, flip: bool) -> Any:
    """Cut ``box`` out of ``img``, resize it to ``size x size`` (bilinear, antialiased), then
    mirror it left-right if ``flip``. Tensors keep their dtype; PIL images stay PIL."""
    x0, y0, x1, y1 = box
    if _is_pil(img):
        pil_image = sys.modules["PIL.Image"]
        view = img.crop(box).resize((size, size), pil_image.Resampling.BILINEAR)
        return view.transpose(pil_image.Transpose.FLIP_LEFT_RIGHT) if flip else view
    crop = img[None, :, y0:y1, x0:x1].float()
    view = F.interpolate(
        crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if flip:
        view = view.flip(-1)
    if img.dtype == torch.uint8:
        return view.round_().clamp_(0, 255).to(torch.uint8)
    return view.to(img.dtype)


# --- photometric ops (torchvision) -----------------------------------------------------------


def _import_torchvision_transforms():
    try:
        from torchvision import transforms
    except ImportError as error:
        raise ImportError(
            "torchvision is needed for the photometric augmentations of TwoViewTransform "
            "(colour jitter, grayscale, blur, solarize, normalize). Install it with "
            "`pip install mgc_kernels[train]` (or `pip install torchvision`), or pass "
            "photometric=False to get the geometric part only (boxes, crops, resize, flips)."
        ) from error
    return transforms


def _photometric_pipelines(size: int) -> dict[str, tuple[Any, Any]]:
    """View 1 and view 2 pipelines for PIL and tensor views: ``{"pil": (p1, p2), "tensor": ...}``.

    PIL views run the ops on PIL (uint8, solarize threshold 128) then ToTensor, as the official
    recipe does; tensor views are first converted to float in [0, 1] (threshold 0.5). Both end
    with ImageNet normalisation.
    """
    T = _import_torchvision_transforms()
    kernel = min(_BLUR_KERNEL, size if size % 2 else size - 1)  # reflect padding needs k <= size
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def ops(blur_p: float, solarize_p: float, threshold: float) -> list:
        steps = [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        ]
        if solarize_p > 0:
            steps.append(T.RandomSolarize(threshold, p=solarize_p))
        return steps

    pil = tuple(T.Compose([*ops(b, s, 128), T.ToTensor(), normalize]) for b, s in _VIEW_RECIPES)
    tensor = tuple(
        T.Compose([T.ConvertImageDtype(torch.float32), *ops(b, s, 0.5), normalize])
        for b, s in _VIEW_RECIPES
    )
    return {"pil": pil, "tensor": tensor}


# --- the transform ---------------------------------------------------------------------------


class TwoViewTransform:
    """MGC's two-view augmentation: an image in, two ``size x size`` views and their geometry out.

    ``__call__(img)`` takes a CHW tensor (uint8 or floating) or a PIL image and returns a dict
    ``{"view1", "view2", "box1", "box2", "flip1", "flip2"}``. A dict because DataLoader's default
    collate batches it key by key into exactly what the pair-sampling ops take (boxes ``[B, 4]``
    float32, flips ``[B]`` bool, views ``[B, C, size, size]``), and because each entry is named
    rather than known by its position in a tuple.

    - Boxes: :func:`sample_view_boxes` (view 2 overlaps view 1 with IoU > ``min_iou``, or is the
      whole image after ``max_tries`` draws), float32 ``[4]`` ``(x0, y0, x1, y1)`` in source pixels.
    - Geometry: crop, bilinear antialiased resize to ``size``, then a horizontal flip with p=0.5
      per view (``flip1``/``flip2``, Python bools). Needs only torch (tensors) or PIL (PIL images).
    - Photometric (``photometric=True``, needs torchvision): both views get ColorJitter(0.4, 0.4,
      0.2, 0.1) p=0.8 and RandomGrayscale p=0.2; view 1 Gaussian blur (sigma in [0.1, 2]) p=1.0;
      view 2 blur p=0.1 and solarize p=0.2; then float tensors normalised with ImageNet mean/std.
      With ``photometric=False`` the views keep the input's type and dtype.

    ``generator`` (a CPU ``torch.Generator``) drives the boxes and flips only; the photometric ops
    draw from torch's global RNG, as torchvision's do. Leave it None with DataLoader workers:
    every worker would get a copy of the same generator and repeat the same crops, whereas torch
    seeds each worker's global RNG differently.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        min_iou: float = 0.2,
        max_tries: int = 1000,
        photometric: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _checks.integer("size", size, 1)
        self.scale = _checks.positive_range("scale", scale)
        self.ratio = _checks.positive_range("ratio", ratio)
        self.min_iou = _min_iou(min_iou)
        self.max_tries = _checks.integer("max_tries", max_tries, 1)
        self.generator = _cpu_generator(generator)
        self._pipelines = _photometric_pipelines(self.size) if photometric else None

    @property
    def photometric(self) -> bool:
        """Whether the views get the photometric augmentations."""
        return self._pipelines is not None

    def __call__(self, img: Any) -> dict[str, Any]:
        height, width = _image_size(img)
        if self._pipelines is not None and isinstance(img, Tensor) and img.shape[0] != 3:
            raise ValueError(
                f"img must have 3 (RGB) channels for the photometric augmentations, got shape "
                f"{tuple(img.shape)}; pass photometric=False for other channel counts"
            )
        box1, box2 = _draw_view_boxes(
            height, width, self.scale, self.ratio, self.min_iou, self.max_tries, self.generator
        )
        flip1, flip2 = (bool(torch.rand((), generator=self.generator) < 0.5) for _ in range(2))
        view1 = _crop_resize_flip(img, box1, self.size, flip1)
        view2 = _crop_resize_flip(img, box2, self.size, flip2)
        if self._pipelines is not None:
            pipeline1, pipeline2 = self._pipelines["pil" if _is_pil(img) else "tensor"]
            view1, view2 = pipeline1(view1), pipeline2(view2)
        return {
            "view1": view1,
            "view2": view2,
            "box1": _as_box_tensor(box1),
            "box2": _as_box_tensor(box2),
            "flip1": flip1,
            "flip2": flip2,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"min_iou={self.min_iou}, max_tries={self.max_tries}, "
            f"photometric={self._pipelines is not None})"
        )


# --- montage (MCL) ---------------------------------------------------------------------------


_RESIZES = ("nearest", "bilinear", None)


def montage(
    images: Tensor,
    ratio: int,
    count: int | None = None,
    *,
    resize: str | None = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MCL's montage pretext: tile ``ratio x ratio`` downsampled images of the batch into one image.

    Montage ``m`` shows in slot ``s`` (row-major: slot ``s`` is tile row ``s // ratio``, column
    ``s % ratio``) the image ``sources[m, s]`` of ``images`` ``[B, C, H, W]`` (a batch of
    augmented views, uint8 or floating), downsampled by ``ratio``:

    - ``resize="nearest"`` (default, the released MCL code's resize): every ``ratio``-th pixel,
      ``images[:, :, ::ratio, ::ratio]`` (what ``F.interpolate(mode="nearest",
      scale_factor=1 / ratio)`` picks): an exact subsample, so uint8 stays exact.
    - ``resize="bilinear"``: ``F.interpolate`` bilinear with ``antialias=True`` and
      ``align_corners=False`` (the pixel-area-correct resize of :class:`TwoViewTransform`); uint8
      tiles are rounded and clamped to [0, 255].
    - ``resize=None``: ``images`` are already the tiles (``[B, C, h, w]``, e.g. a fresh
      augmentation made at ``1 / ratio`` of the view size by the data loader); the montages are
      ``[count, C, ratio * h, ratio * w]``.

    How images are drawn (``count * ratio**2`` slots, filled montage by montage in slot order):
    a random permutation of the batch fills the first ``B`` slots, so with
    ``count * ratio**2 >= B`` every image appears at least once; the remaining slots get random
    images, within each montage first those it does not hold yet (no image twice in one montage
    while the batch has images left for it), then further random rounds of the whole batch.
    With ``count * ratio**2 < B`` the montages hold a random subset of the batch, each image at
    most once. ``count`` defaults to ``ceil(B / ratio**2)``, the fewest montages that hold every
    image (about ``B / ratio**2``, the released configuration's count: each image about once per
    level). ``ratio=1`` with ``count == B`` returns a copy of ``images`` and
    ``sources = arange(B)[:, None]`` without drawing.

    Args:
        images: ``[B, C, H, W]``; ``H`` and ``W`` divisible by ``ratio`` unless ``resize`` is None.
        ratio: tiles per side (a positive int).
        count: montages to build (a positive int); None for ``ceil(B / ratio**2)``.
        resize: ``"nearest"``, ``"bilinear"`` or None (see above).
        generator: a CPU ``torch.Generator`` for reproducible draws (None: torch's global RNG).

    Returns ``(montages [count, C, H', W']`` in the dtype of ``images``, ``sources
    [count, ratio**2]`` long, on the device of ``images``); ``H' x W'`` is ``H x W``, or
    ``ratio * H x ratio * W`` for ``resize=None``. Differentiable in ``images``.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a [B, C, H, W] torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.numel() == 0:
        raise ValueError(
            f"images must be a non-empty [B, C, H, W] tensor, got shape {tuple(images.shape)}"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be a uint8 or floating tensor, got dtype {images.dtype}")
    ratio = _checks.integer("ratio", ratio, 1)
    _checks.choice("resize", resize, _RESIZES)
    batch, channels, height, width = images.shape
    if resize is not None and (height % ratio or width % ratio):
        raise ValueError(
            f"ratio must divide the image height and width, got ratio={ratio} for images of "
            f"shape {tuple(images.shape)} (H={height}, W={width})"
        )
    slots = ratio * ratio
    count = -(-batch // slots) if count is None else _checks.integer("count", count, 1)
    generator = _cpu_generator(generator)
    if ratio == 1 and count == batch:
        return images.clone(), torch.arange(batch, device=images.device)[:, None]
    sources = _draw_montage_sources(batch, count, slots, generator).to(images.device)
    tiles = _montage_tiles(images, ratio, resize)
    h, w = tiles.shape[-2:]
    tiled = tiles[sources.reshape(-1)].reshape(count, ratio, ratio, channels, h, w)
    return tiled.permute(0, 3, 1, 4, 2, 5).reshape(count, channels, ratio * h, ratio * w), sources


def _draw_montage_sources(
    batch: int, count: int, slots: int, generator: torch.Generator | None
) -> Tensor:
    """``[count, slots]`` batch indices: a permutation of the batch first, then per montage
    the images it lacks in random order, then random rounds of the whole batch (see montage)."""
    total = count * slots
    first = torch.randperm(batch, generator=generator)
    if total <= batch:
        return first[:total].reshape(count, slots)
    sources = torch.empty(total, dtype=torch.long)
    sources[:batch] = first
    sources = sources.reshape(count, slots)
    start = batch // slots  # the first montage with slots left after the permutation
    held = batch - start * slots  # its slots the permutation filled
    rounds = -(-slots // batch)  # rounds of the batch a montage may need
    keys = torch.rand(count - start, rounds, batch, generator=generator)
    if held:  # the images it holds already come last in its first round
        keys[0, 0, sources[start, :held]] += 1.0
    order = keys.argsort(-1).reshape(count - start, rounds * batch)
    sources[start, held:] = order[0, : slots - held]
    sources[start + 1 :] = order[1:, :slots]
    return sources


def _montage_tiles(images: Tensor, ratio: int, resize: str | None) -> Tensor:
    """``[B, C, H / ratio, W / ratio]``: every image downsampled once (or as it is)."""
    if resize is None or ratio == 1:
        return images
    if resize == "nearest":
        return images[:, :, ::ratio, ::ratio]
    height, width = images.shape[-2:]
    work = images.double() if images.dtype == torch.float64 else images.float()
    small = F.interpolate(
        work,
        size=(height // ratio, width // ratio),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    if images.dtype == torch.uint8:
        small = small.round_().clamp_(0, 255)
    return small.to(images.dtype)
