"""Datasets of the reference trainer: procedural synthetic scenes (the default, no download) and
any folder of images (COCO train2017, ImageNet, anything nested).

Every dataset item is a dict with a uint8 ``"image"`` tensor ``[3, H, W]`` (RGB) and an int
``"label"`` (-1 where the images are unlabelled); synthetic scenes add a per-pixel ``"mask"``,
image folders an int ``"bad_images"`` (1 where a file that does not decode was replaced).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps

# --------------------------------------------------------------------------------------------
# Synthetic scenes
# --------------------------------------------------------------------------------------------

# Area of each shape is AREA_PER_R2[class] * r**2 for its size parameter r, so a target area can
# be turned into a size; EXTENT_PER_R is how far the shape reaches from its centre (in units of r)
# at the worst rotation, used to keep objects mostly inside the image.
_RING_INNER = 0.6
_CROSS_HALF_WIDTH = 0.3
_AREA_PER_R2 = {
    1: math.pi,
    2: 4.0,
    3: 3.0 * math.sqrt(3.0) / 4.0,
    4: math.pi * (1.0 - _RING_INNER**2),
    5: 8.0 * _CROSS_HALF_WIDTH - 4.0 * _CROSS_HALF_WIDTH**2,
}
_EXTENT_PER_R = {1: 1.0, 2: math.sqrt(2.0), 3: 1.0, 4: 1.0, 5: math.hypot(1.0, _CROSS_HALF_WIDTH)}

_BACKGROUND_TEXTURES = ("gradient", "stripes", "checker", "noise")
_OBJECT_TEXTURES = ("solid", "stripes", "checker", "dots")
_MAIN_AREA_RANGE = (0.15, 0.35)  # fraction of the image
_DISTRACTOR_AREA_RANGE = (0.02, 0.07)
_PLACEMENT_TRIES = 4  # per distractor, before it is left out
_PIXEL_NOISE_STD = 3.0


def stream_seed(seed: int, index: int) -> int:
    """32-bit generator seed of item ``index`` of the stream ``seed`` (scenes; the loader's
    per-sample augmentations).

    torch's CPU generator keeps only the low 32 bits of its seed, so ``seed * length + index``
    would alias across seeds. Instead the dataset seed is hashed to a 32-bit offset and the index
    added to it, then scrambled by a bijection (murmur3's finaliser): distinct indices of one
    dataset never share a seed, and the ``seed`` and ``seed + 1`` splits (offsets about 1.6e9
    apart) share none unless their lengths pass a billion.
    """
    mask32 = 0xFFFFFFFF
    offset = (seed * 0x9E3779B97F4A7C15) >> 32 & mask32
    key = (offset + index) & mask32
    key ^= key >> 16
    key = (key * 0x85EBCA6B) & mask32
    key ^= key >> 13
    key = (key * 0xC2B2AE35) & mask32
    return key ^ (key >> 16)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, options: tuple[str, ...]) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def _along_random_direction(
    xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    angle = _uniform(generator, 0.0, math.pi)
    return xs * math.cos(angle) + ys * math.sin(angle)


def _pattern(
    kind: str, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A texture on the pixel grid, values in [-1, 1]; 'solid' is all zeros."""
    size = xs.shape[-1]
    if kind == "solid":
        return torch.zeros_like(xs)
    if kind == "gradient":
        along = _along_random_direction(xs, ys, generator)
        return (along - along.mean()) / (size * 0.71)
    if kind == "stripes":
        along = _along_random_direction(xs, ys, generator)
        period = _uniform(generator, 0.05, 0.2) * size
        return torch.sin(along * (2.0 * math.pi / period) + _uniform(generator, 0.0, 2 * math.pi))
    if kind == "checker":
        cell = _uniform(generator, 0.04, 0.15) * size
        return torch.sign(torch.sin(xs * (math.pi / cell)) * torch.sin(ys * (math.pi / cell)))
    if kind == "dots":
        period = _uniform(generator, 0.06, 0.15) * size
        waves = torch.cos(xs * (2.0 * math.pi / period)) * torch.cos(ys * (2.0 * math.pi / period))
        return torch.where(waves > 0.5, 1.0, -1.0)
    if kind == "noise":
        cells = int(torch.randint(3, 9, (), generator=generator))
        coarse = torch.randn(1, 1, cells, cells, generator=generator)
        smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        return smooth[0, 0] / smooth.abs().max().clamp_min(1e-6)
    raise ValueError(f"unknown texture {kind!r}")


def _textured_fill(
    base_colour: torch.Tensor,
    kind: str,
    amplitude: float,
    xs: torch.Tensor,
    ys: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[3, S, S]`` float image: a colour varied along a random colour direction by a texture."""
    tint = torch.rand(3, generator=generator) * 2.0 - 1.0
    texture = _pattern(kind, xs, ys, generator)
    return base_colour[:, None, None] + amplitude * tint[:, None, None] * texture


def _shape_mask(shape_class: int, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Pixels inside a shape of size ``r`` given the pixel coordinates ``u, v`` in its frame."""
    if shape_class == 1:
        return u * u + v * v <= r * r
    if shape_class == 2:
        return torch.maximum(u.abs(), v.abs()) <= r
    if shape_class == 3:
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):  # three edges of an equilateral triangle with circumradius r
            normal = -math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(normal) + v * math.sin(normal) <= r / 2
        return inside
    if shape_class == 4:
        squared_radius = u * u + v * v
        return (squared_radius <= r * r) & (squared_radius >= (_RING_INNER * r) ** 2)
    if shape_class == 5:
        width, length = _CROSS_HALF_WIDTH * r, r
        bar_u = (u.abs() <= length) & (v.abs() <= width)
        bar_v = (v.abs() <= length) & (u.abs() <= width)
        return bar_u | bar_v
    raise ValueError(f"unknown shape class {shape_class}")


def _random_shape(
    shape_class: int,
    area_range: tuple[float, float],
    inset: float,
    xs: torch.Tensor,
    ys: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mask of one shape with a random area, rotation and position.

    The centre is drawn at least ``inset`` times the shape's reach from every border, so an inset
    of 0.9 keeps the shape almost entirely inside and 0.5 lets up to about half of it leave.
    """
    size = xs.shape[-1]
    area = _uniform(generator, *area_range) * size * size
    r = math.sqrt(area / _AREA_PER_R2[shape_class])
    margin = min(inset * _EXTENT_PER_R[shape_class] * r, size / 2)
    cx, cy = _uniform(generator, margin, size - margin), _uniform(generator, margin, size - margin)
    angle = _uniform(generator, 0.0, 2.0 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = xs - cx, ys - cy
    return _shape_mask(shape_class, dx * cos + dy * sin, dy * cos - dx * sin, r)


def _object_fill(
    background_colour: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Colour and texture of an object, independent of its class.

    Each channel is offset from the background's by 64..192 modulo 256, so the object always
    differs from the background by at least 64 levels per channel while its colour, over many
    scenes, is spread over the whole cube whatever the shape.
    """
    offset = 64.0 + 128.0 * torch.rand(3, generator=generator)
    colour = torch.remainder(background_colour + offset, 256.0)
    kind = _choice(generator, _OBJECT_TEXTURES)
    return _textured_fill(colour, kind, _uniform(generator, 10.0, 35.0), xs, ys, generator)


class SyntheticScenes(torch.utils.data.Dataset):
    """Procedural scenes of simple shapes on textured backgrounds, made on the fly.

    The default dataset of the trainer: it needs no download, is identical on every machine, and
    its per-pixel masks give dense labels for evaluating dense (MGC, DenseCL) features. Scene
    ``i`` is a pure function of ``(seed, i)``, drawn from a local ``torch.Generator`` (the global
    RNG is never touched), so data-loader workers need no seeding; train and eval splits use
    different seeds (the trainer uses ``seed`` and ``seed + 1``).

    A scene is a textured background (random colour plus a gradient, stripes, checkerboard or
    low-frequency noise), one main object covering 15-35 % of the image whose class is the scene's
    ``label``, then 1-3 smaller distractors (2-7 % each) of random classes painted over it. A
    distractor placement that would leave less than half of the main object visible is redrawn
    (up to 4 times, then the distractor is left out), so the label's class always covers a clear
    part of the image. Every object has a random size, rotation, position, colour and texture
    (solid, stripes, checker, dots): the class is given by the shape alone. A little Gaussian
    pixel noise is added last. ``mask`` holds the class of the visible object at each pixel.

    Speed: 0.9 ms per 128 px scene, single-threaded on one core of a 2-core CPU (measured on the
    development machine over 1000 scenes).
    """

    CLASSES = ("background", "disc", "square", "triangle", "ring", "cross")
    NUM_CLASSES = 6

    def __init__(self, length: int = 4096, image_size: int = 128, seed: int = 0) -> None:
        _check_int("length", length, minimum=1)
        _check_int("image_size", image_size, minimum=32)
        _check_int("seed", seed, minimum=0)
        self.length, self.image_size, self.seed = length, image_size, seed
        centres = torch.arange(image_size, dtype=torch.float32) + 0.5
        self._ys, self._xs = torch.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} scenes")
        generator = torch.Generator().manual_seed(stream_seed(self.seed, index))
        return self._make_scene(generator)

    def _make_scene(self, generator: torch.Generator) -> dict:
        xs, ys = self._xs, self._ys
        background_colour = 30.0 + 195.0 * torch.rand(3, generator=generator)
        kind = _choice(generator, _BACKGROUND_TEXTURES)
        image = _textured_fill(
            background_colour, kind, _uniform(generator, 15.0, 50.0), xs, ys, generator
        )
        mask = torch.zeros(xs.shape, dtype=torch.int64)

        label = int(torch.randint(1, self.NUM_CLASSES, (), generator=generator))
        main = _random_shape(label, _MAIN_AREA_RANGE, 0.9, xs, ys, generator)
        self._paint(image, mask, main, label, background_colour, generator)
        main_visible = main
        min_main_visible = int(main.sum()) / 2

        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            shape_class = int(torch.randint(1, self.NUM_CLASSES, (), generator=generator))
            for _ in range(_PLACEMENT_TRIES):
                distractor = _random_shape(
                    shape_class, _DISTRACTOR_AREA_RANGE, 0.5, xs, ys, generator
                )
                still_visible = main_visible & ~distractor
                if int(still_visible.sum()) >= min_main_visible:
                    main_visible = still_visible
                    self._paint(image, mask, distractor, shape_class, background_colour, generator)
                    break

        image += _PIXEL_NOISE_STD * torch.randn(image.shape, generator=generator)
        pixels = image.round_().clamp_(0.0, 255.0).to(torch.uint8)
        return {"image": pixels, "mask": mask, "label": label}

    def _paint(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        region: torch.Tensor,
        shape_class: int,
        background_colour: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Paint a new object over ``region`` in place: it hides whatever was there before."""
        fill = _object_fill(background_colour, self._xs, self._ys, generator)
        image.copy_(torch.where(region, fill, image))
        mask.masked_fill_(region, shape_class)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

NEUTRAL_GREY = 128  # what transparent pixels show (see rgb_array)
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# What a bad file makes PIL raise: unreadable, not an image, truncated, corrupt streams, or
# larger than PIL's decompression-bomb limit.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
_HEADER_THREADS = 8  # opening files is latency-bound on network filesystems
_LISTED_PATHS = 5  # paths named in the warning about left-out files


class BadImageWarning(UserWarning):
    """An image file that was left out (at construction) or replaced (when loaded)."""


def rgb_array(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels of a PIL image of any mode, as a viewer would show it.

    - EXIF orientation is applied first, so a photo stored sideways comes out upright.
    - 16-bit and wider greyscale ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"): values are
      clipped to 0..65535 and scaled by 255 / 65535, rounded to nearest (no ties can occur), then
      repeated in the three channels (a transparency entry, rare there, is ignored). PIL's
      ``convert("RGB")`` clips at 255 instead, which makes a 16-bit PNG almost white.
    - Alpha ("RGBA", "RGBa", "LA", "La", "PA", and any image with a ``transparency`` entry:
      "P" with transparent palette entries, "L" or "RGB" with a PNG tRNS colour): converted to
      RGBA by PIL, then composited onto the fixed grey :data:`NEUTRAL_GREY` (128), each channel
      ``round((c * a + 128 * (255 - a)) / 255)``. Dropping alpha instead would show whatever
      colours the encoder left under transparent pixels.
    - Everything else ("RGB", "L", "1", "P", "CMYK", "YCbCr", ...): PIL's ``convert("RGB")``
      (CMYK by PIL's naive formula: embedded ICC profiles are not applied).
    """
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0.0, 65535.0)
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[:, :, 3:]
        blended = rgba[:, :, :3] * alpha + NEUTRAL_GREY * (255 - alpha)
        return ((blended + 127) // 255).astype(np.uint8)
    return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file fully into :func:`rgb_array` pixels.

    Images between PIL's two decompression-bomb limits (89 to 179 megapixels by default) are
    large photos, not attacks, in one's own dataset: PIL's warning about them is silenced.
    Larger ones make PIL raise, as any bad file does (see :class:`ImageFolder`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            return rgb_array(opened)


class _ImageFiles(torch.utils.data.Dataset):
    """Labelled image files decoded so that a bad one never stops a run: the part that
    :class:`ImageFolder` and :class:`LabelledImageFolder` share.

    A file that cannot be decoded when loaded is replaced by the next file (in index order,
    wrapping around) that decodes, and its item says so with ``"bad_images": 1``. The replacement
    depends only on the files, so a resumed run sees the same data. Each process warns once per
    bad file (:class:`BadImageWarning`, naming the file).
    """

    def __init__(self, root: Path, files: list[Path], labels: list[int]) -> None:
        self.root, self.files, self.labels = root, files, labels
        self._warned: set[Path] = set()
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            warnings.warn(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some imported "
                "module): truncated images will load partly grey instead of being "
                "replaced and counted in bad_images",
                BadImageWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} is out of range for {len(self.files)} images")
        used, pixels = self._decode_from(index)
        return {
            "image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            "label": self.labels[used],
            "bad_images": int(used != index),
        }

    def _decode_from(self, index: int) -> tuple[int, np.ndarray]:
        """The index and pixels of the first file from ``index`` on (wrapping) that decodes."""
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            try:
                return candidate, load_rgb(self.files[candidate])
            except _DECODE_ERRORS as error:
                self._warn_once(self.files[candidate], error)
        raise RuntimeError(
            f"none of the {len(self.files)} images under {str(self.root)!r} "
            "decodes any more (the warnings above name each file and its "
            "error); is the folder still mounted and readable?"
        )

    def _warn_once(self, path: Path, error: Exception) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(
                f"cannot decode image {str(path)!r} ({error}); the next image that "
                "decodes is used in its place (counted in bad_images)",
                BadImageWarning,
                stacklevel=4,
            )


class ImageFolder(_ImageFiles):
    """Every image under ``root``, at any depth, without labels.

    Serves COCO train2017 (a flat folder of .jpg), ImageNet (one subfolder per class: the classes
    are ignored, SSL pretraining does not use them) or any nested folder. Files are found
    recursively (symlinked folders followed, extensions matched case-insensitively) and sorted
    by their path relative to ``root``, so index ``i`` is the same file on every machine.

    At construction every file's header is read (not its pixels: about 0.1 ms a file, two
    minutes for ImageNet's 1.28 M); files that PIL cannot open, or that exceed its
    decompression-bomb limit (179 megapixels by default; raise ``PIL.Image.MAX_IMAGE_PIXELS``
    before building the dataset to keep them: one would take over 0.5 GB per loader worker),
    are left out with one :class:`BadImageWarning`. Files that open but do not decode (truncated
    or corrupt data) are replaced when loaded, see :class:`_ImageFiles`. Items are
    ``{"image": uint8 [3, H, W], "label": -1, "bad_images": 0 or 1}``, converted from any PIL
    mode by :func:`rgb_array`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = _existing_folder(root, "image folder")
        found = _find_images(root)
        files = _readable(found)
        if not files:
            raise ValueError(
                f"no images found under {str(root)!r} (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case; "
                f"{len(found)} file(s) rejected as unreadable)"
            )
        super().__init__(root, files, [-1] * len(files))


class LabelledImageFolder(_ImageFiles):
    """Images in one subfolder per class (ImageNet's layout), labelled by their class.

    The classes are ``root``'s subfolders sorted by name (or ``classes``, in that order: a
    validation split passes its training split's, and must then hold exactly those class
    folders); the label is the class's position. Each class folder is searched recursively and
    checked like :class:`ImageFolder`; files directly in ``root`` belong to no class and are
    ignored. Items are ``{"image": uint8 [3, H, W], "label": int, "bad_images": 0 or 1}``; a
    replaced image keeps its own label.
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None) -> None:
        root = _existing_folder(root, "labelled image folder")
        folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.classes = _check_classes(root, folders, classes)
        found = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in _find_images(root / name)
        ]
        readable = set(_readable([path for path, _ in found]))
        kept = [(path, label) for path, label in found if path in readable]
        found_per_class = Counter(label for _, label in found)
        kept_per_class = Counter(label for _, label in kept)
        for label, name in enumerate(self.classes):
            if kept_per_class[label] == 0:
                raise ValueError(
                    f"class folder {str(root / name)!r} has no readable images "
                    f"({found_per_class[label]} file(s) rejected; searched "
                    f"recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)"
                )
        super().__init__(root, [path for path, _ in kept], [label for _, label in kept])


def _check_classes(root: Path, folders: list[str], classes: list[str] | None) -> list[str]:
    if classes is None:
        if len(folders) < 2:
            raise ValueError(
                f"labelled image folder {str(root)!r} must hold one subfolder per "
                f"class, at least 2; found {len(folders)}: {folders}"
            )
        return folders
    if sorted(classes) != folders:
        missing = sorted(set(classes) - set(folders))
        extra = sorted(set(folders) - set(classes))
        raise ValueError(
            f"labelled image folder {str(root)!r} must hold the same class "
            f"folders as its training split; missing {missing}, extra {extra}"
        )
    return list(classes)


def _existing_folder(root: str | os.PathLike, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} {str(root)!r} is not a directory")
    return root


def _find_images(root: Path) -> list[Path]:
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        found += [Path(folder, name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _readable(paths: list[Path]) -> list[Path]:
    """The ``paths`` whose header PIL reads, in order; one warning names the others."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(_HEADER_THREADS) as pool:
            problems = list(pool.map(_header_problem, paths, chunksize=256))
    rejected = [
        f"{str(path)!r} ({problem})"
        for path, problem in zip(paths, problems)
        if problem is not None
    ]
    if rejected:
        more = f" and {len(rejected) - _LISTED_PATHS} more" if len(rejected) > _LISTED_PATHS else ""
        warnings.warn(
            f"left out {len(rejected)} of {len(paths)} image file(s) that cannot be "
            f"opened: {', '.join(rejected[:_LISTED_PATHS])}{more}",
            BadImageWarning,
            stacklevel=3,
        )
    return [path for path, problem in zip(paths, problems) if problem is None]


def _header_problem(path: Path) -> str | None:
    """Why PIL cannot open ``path`` (reading its header only), or None if it can."""
    try:
        with Image.open(path):
            return None
    except _DECODE_ERRORS as error:
        return str(error) or type(error).__name__


# --------------------------------------------------------------------------------------------
# Choosing a dataset
# --------------------------------------------------------------------------------------------


def build_dataset(
    name_or_path: str, *, length: int, image_size: int, seed: int
) -> torch.utils.data.Dataset:
    """``"synthetic"`` gives :class:`SyntheticScenes`; anything else is an image folder's path
    (``length``, ``image_size`` and ``seed`` then do not apply: the folder sets the length and
    resizing is the transforms' job)."""
    if name_or_path == "synthetic":
        return SyntheticScenes(length=length, image_size=image_size, seed=seed)
    return ImageFolder(name_or_path)
