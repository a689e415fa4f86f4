"""Datasets of the reference trainer: synthetic scenes (determinism, masks, labels that only the
shape gives away) and image folders (discovery, decoding every PIL mode, bad files left out or
replaced with warnings that name them, labelled class folders)."""

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mgc_kernels.transforms import TwoViewTransform
from mgc_pretrain.data import (
    NEUTRAL_GREY,
    BadImageWarning,
    ImageFolder,
    LabelledImageFolder,
    SyntheticScenes,
    build_dataset,
    rgb_array,
)
from mgc_pretrain.loader import TwoViews

SCENE_COUNT = 240


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    dataset = SyntheticScenes(length=SCENE_COUNT, image_size=64, seed=0)
    return [dataset[i] for i in range(len(dataset))]


# ---- synthetic scenes ----------------------------------------------------------------------


def test_scene_is_a_function_of_seed_and_index():
    first, again = SyntheticScenes(seed=3)[17], SyntheticScenes(seed=3)[17]
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["mask"], again["mask"])
    assert first["label"] == again["label"]


def test_other_seed_or_index_gives_another_scene():
    reference = SyntheticScenes(seed=3)[17]["image"]
    assert not torch.equal(reference, SyntheticScenes(seed=4)[17]["image"])
    assert not torch.equal(reference, SyntheticScenes(seed=3)[18]["image"])


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    SyntheticScenes()[5]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("size", [32, 128])
def test_shapes_and_dtypes(size):
    scene = SyntheticScenes(length=3, image_size=size)[2]
    assert scene["image"].shape == (3, size, size) and scene["image"].dtype == torch.uint8
    assert scene["mask"].shape == (size, size) and scene["mask"].dtype == torch.int64
    assert isinstance(scene["label"], int)


def test_masks_hold_valid_classes_and_the_label_is_clearly_visible(scenes):
    for scene in scenes:
        mask, label = scene["mask"], scene["label"]
        assert 0 <= int(mask.min()) and int(mask.max()) < SyntheticScenes.NUM_CLASSES
        assert 1 <= label < SyntheticScenes.NUM_CLASSES
        assert (mask == label).float().mean() >= 0.05


def test_every_class_appears(scenes):
    classes_in_masks = set(torch.cat([s["mask"].unique() for s in scenes]).tolist())
    assert classes_in_masks == set(range(SyntheticScenes.NUM_CLASSES))
    assert {s["label"] for s in scenes} == set(range(1, SyntheticScenes.NUM_CLASSES))


def test_colour_does_not_give_the_class_away(scenes):
    """A nearest-centroid classifier on the mean colour of the labelled object, fitted on half the
    scenes, is near chance (1/5) on the other half; it would be near 1 if colour followed class."""
    colours = torch.stack(
        [s["image"].float()[:, s["mask"] == s["label"]].mean(dim=1) for s in scenes]
    )
    labels = torch.tensor([s["label"] for s in scenes])
    half = len(scenes) // 2
    centroids = torch.stack(
        [
            colours[:half][labels[:half] == c].mean(dim=0)
            for c in range(1, SyntheticScenes.NUM_CLASSES)
        ]
    )
    predicted = torch.cdist(colours[half:], centroids).argmin(dim=1) + 1
    accuracy = (predicted == labels[half:]).float().mean().item()
    assert accuracy < 0.4


@pytest.mark.parametrize("index", [-1, 4])
def test_index_out_of_range(index):
    with pytest.raises(IndexError, match=str(index)):
        SyntheticScenes(length=4)[index]


@pytest.mark.parametrize(
    "name, value",
    [
        ("length", 0),
        ("length", True),
        ("image_size", 31),
        ("image_size", 64.0),
        ("seed", -1),
        ("seed", "1"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(name, value):
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(repr(value))}"):
        SyntheticScenes(**{name: value})


# ---- image folders -------------------------------------------------------------------------


def _write_image(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """Nested folder: two class-like subfolders, a file at the top, a non-image file, mixed case
    extensions. Returns the root and the PNG pixels written to ``a/sub/y.png``."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    _write_image(tmp_path / "a" / "sub" / "y.png", pixels)
    _write_image(tmp_path / "a" / "x.jpg", pixels)
    _write_image(tmp_path / "b" / "z.PNG", pixels[:, :, 0])  # greyscale
    _write_image(tmp_path / "c.jpeg", pixels)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    return tmp_path, pixels


def test_image_folder_finds_images_recursively_in_sorted_order(image_tree):
    root, _ = image_tree
    dataset = ImageFolder(root)
    relative = [path.relative_to(root).as_posix() for path in dataset.files]
    assert relative == ["a/sub/y.png", "a/x.jpg", "b/z.PNG", "c.jpeg"]
    assert len(dataset) == 4


def test_image_folder_loads_rgb_uint8(image_tree):
    root, pixels = image_tree
    dataset = ImageFolder(root)
    png, jpg, grey = dataset[0], dataset[1], dataset[2]
    assert torch.equal(png["image"], torch.from_numpy(pixels).permute(2, 0, 1))
    assert png["label"] == -1 and png["bad_images"] == 0
    assert jpg["image"].shape == (3, 7, 5) and jpg["image"].dtype == torch.uint8
    channels = grey["image"]
    assert channels.shape == (3, 7, 5)
    assert torch.equal(channels[0], torch.from_numpy(pixels[:, :, 0]))
    assert torch.equal(channels[0], channels[1]) and torch.equal(channels[0], channels[2])


def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ImageFolder(missing)


def test_root_that_is_a_file_names_the_path(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(str(file))):
        ImageFolder(file)


def test_folder_without_images_names_folder_and_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*\.jpg"):
        ImageFolder(tmp_path)


# ---- bad files -----------------------------------------------------------------------------


def _noise_jpeg(path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    _write_image(path, pixels)


def _truncate(path) -> None:
    """Keep the header and half the compressed data: PIL opens it, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_image_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, BadImageWarning)]


def test_files_that_do_not_open_are_left_out_with_one_warning(tmp_path):
    _noise_jpeg(tmp_path / "b.jpg", 0)
    (tmp_path / "a.jpg").write_text("this is not a jpeg")
    (tmp_path / "c.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = ImageFolder(tmp_path)
    assert [path.name for path in dataset.files] == ["b.jpg"]
    [message] = _bad_image_warnings(record)
    assert "left out 2 of 3" in message
    assert str(tmp_path / "a.jpg") in message and str(tmp_path / "c.png") in message


def test_folder_of_unreadable_files_says_how_many_were_rejected(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_text("not an image")
    with (
        pytest.warns(BadImageWarning),
        pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*2 file\(s\) rejected"),
    ):
        ImageFolder(tmp_path)


@pytest.fixture
def truncated_tree(tmp_path):
    """a.jpg, b.jpg, c.jpg decode; b.jpg and d.jpg (the last file) are truncated."""
    for seed, name in enumerate("abcd"):
        _noise_jpeg(tmp_path / f"{name}.jpg", seed)
    _truncate(tmp_path / "b.jpg")
    _truncate(tmp_path / "d.jpg")
    return tmp_path


def test_truncated_image_is_replaced_by_the_next_and_counted(truncated_tree):
    dataset = ImageFolder(truncated_tree)
    assert len(dataset) == 4  # the header check lets truncated files through
    with pytest.warns(BadImageWarning, match=re.escape(str(truncated_tree / "b.jpg"))):
        replaced = dataset[1]
    following = dataset[2]
    assert torch.equal(replaced["image"], following["image"])
    assert (replaced["bad_images"], following["bad_images"]) == (1, 0)


def test_replacement_wraps_around_and_is_deterministic(truncated_tree):
    with pytest.warns(BadImageWarning, match=re.escape(str(truncated_tree / "d.jpg"))):
        wrapped = ImageFolder(truncated_tree)[3]
    first = ImageFolder(truncated_tree)[0]
    assert torch.equal(wrapped["image"], first["image"]) and wrapped["bad_images"] == 1
    with pytest.warns(BadImageWarning):
        again = ImageFolder(truncated_tree)[3]
    assert torch.equal(again["image"], wrapped["image"])


def test_each_bad_file_warns_once(truncated_tree):
    dataset = ImageFolder(truncated_tree)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            dataset[1]
            dataset[3]
    assert len(_bad_image_warnings(record)) == 2


def test_truncated_images_are_not_loaded_silently():
    """Nothing the trainer imports may switch PIL to filling truncated images with grey."""
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    import mgc_pretrain.probes  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_two_views_pass_the_bad_image_count(truncated_tree):
    transform = TwoViewTransform(32)
    with pytest.warns(BadImageWarning):
        replaced = TwoViews(ImageFolder(truncated_tree), transform, seed=0)[1]
    scene = TwoViews(SyntheticScenes(length=2, image_size=64), transform, seed=0)[1]
    assert replaced["bad_images"] == 1 and type(replaced["bad_images"]) is int
    assert scene["bad_images"] == 0 and replaced["view1"].shape == (3, 32, 32)


# ---- image modes ---------------------------------------------------------------------------


def _load_saved(image: Image.Image, tmp_path, name: str, **save_args) -> np.ndarray:
    """Save ``image`` into a one-file folder and load it back through :class:`ImageFolder`."""
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    image.save(folder / name, **save_args)
    return ImageFolder(folder)[0]["image"].permute(1, 2, 0).numpy()


def test_sixteen_bit_grey_png_spans_the_full_range(tmp_path):
    raw = np.concatenate([np.linspace(0, 65535, 40), [1, 128, 129, 385, 386, 65534]])
    raw = np.tile(raw.round().astype(np.uint16), (3, 1))
    loaded = _load_saved(Image.fromarray(raw), tmp_path, "grey16.png")
    expected = np.round(raw.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert loaded.shape == (*raw.shape, 3) and loaded[0, 0, 0] == 0 and loaded[0, 39, 0] == 255
    for channel in range(3):
        np.testing.assert_array_equal(loaded[:, :, channel], expected)


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_other_high_depth_modes_use_the_same_scale(mode):
    raw = np.array([[0, 257, 32767, 65535]], dtype=np.uint16)
    if mode == "I;16B":
        image = Image.frombytes(mode, (4, 1), raw.astype(">u2").tobytes())
    else:
        image = Image.fromarray(raw.astype(np.int32 if mode == "I" else np.float32), mode)
    assert image.mode == mode
    np.testing.assert_array_equal(rgb_array(image)[0, :, 0], [0, 1, 127, 255])


def test_transparent_pixels_show_neutral_grey(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(4, 6, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255  # row 0 fully transparent, row 1 opaque
    loaded = _load_saved(Image.fromarray(rgba, "RGBA"), tmp_path, "rgba.png").astype(np.int64)
    colour, alpha = rgba[:, :, :3].astype(np.float64), rgba[:, :, 3:].astype(np.float64)
    expected = np.round((colour * alpha + NEUTRAL_GREY * (255 - alpha)) / 255)
    assert (loaded[0] == NEUTRAL_GREY).all()
    np.testing.assert_array_equal(loaded[1], rgba[1, :, :3])
    np.testing.assert_array_equal(loaded, expected)


def _palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    return image


def test_palette_images_show_their_colours_and_transparency(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]])
    red, green, blue, grey = [255, 0, 0], [0, 255, 0], [0, 0, 255], [NEUTRAL_GREY] * 3
    opaque = _load_saved(_palette_image(indices), tmp_path, "palette.png")
    np.testing.assert_array_equal(opaque, [[red, green, blue], [blue, green, red]])
    see_through = _load_saved(_palette_image(indices), tmp_path, "transparent.png", transparency=1)
    np.testing.assert_array_equal(see_through, [[red, grey, blue], [blue, grey, red]])


def test_palette_with_alpha_shows_grey():
    image = _palette_image(np.zeros((1, 2))).convert("PA")
    image.putalpha(Image.fromarray(np.array([[255, 0]], dtype=np.uint8)))
    assert image.mode == "PA"
    np.testing.assert_array_equal(rgb_array(image), [[[255, 0, 0], [NEUTRAL_GREY] * 3]])


def test_grey_with_alpha_shows_grey_where_transparent(tmp_path):
    la = np.array([[[200, 255], [200, 0], [10, 255]]], dtype=np.uint8)
    loaded = _load_saved(Image.fromarray(la, "LA"), tmp_path, "la.png")
    np.testing.assert_array_equal(loaded, [[[200] * 3, [NEUTRAL_GREY] * 3, [10] * 3]])


def test_cmyk_jpeg_shows_its_colours(tmp_path):
    cmyk = np.zeros((16, 48, 4), dtype=np.uint8)
    cmyk[:, :16], cmyk[:, 16:32], cmyk[:, 32:] = (0, 255, 255, 0), (255, 0, 255, 0), (0, 0, 0, 255)
    loaded = _load_saved(Image.fromarray(cmyk, "CMYK"), tmp_path, "cmyk.jpg", quality=95)
    centres = loaded[8, [8, 24, 40]].astype(np.int64)
    assert np.abs(centres - [[255, 0, 0], [0, 255, 0], [0, 0, 0]]).max() <= 3  # JPEG is lossy


def test_one_bit_image_is_black_and_white(tmp_path):
    bits = np.array([[True, False], [False, True]])
    loaded = _load_saved(Image.fromarray(bits), tmp_path, "bits.bmp")
    np.testing.assert_array_equal(loaded[:, :, 0], bits * 255)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 9
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    loaded = _load_saved(Image.fromarray(pixels), tmp_path, "rotated.png", exif=exif)
    np.testing.assert_array_equal(loaded, np.rot90(pixels, k=-1))


# ---- labelled image folders ----------------------------------------------------------------


def _class_tree(root, counts: dict[str, int]) -> None:
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    for name, count in counts.items():
        for i in range(count):
            _write_image(root / name / f"{i}.png", pixels + i)


def test_labelled_folder_labels_by_sorted_class_folder(tmp_path):
    _class_tree(tmp_path, {"dog": 2, "cat": 1, "emu": 1})
    _write_image(tmp_path / "loose.png", np.zeros((4, 4, 3), dtype=np.uint8))
    dataset = LabelledImageFolder(tmp_path)
    assert dataset.classes == ["cat", "dog", "emu"]
    assert [dataset[i]["label"] for i in range(len(dataset))] == [0, 1, 1, 2]
    assert dataset[2]["image"].shape == (3, 4, 4) and dataset[2]["bad_images"] == 0


def test_labelled_folder_with_given_classes_keeps_their_order(tmp_path):
    _class_tree(tmp_path, {"cat": 1, "dog": 1})
    dataset = LabelledImageFolder(tmp_path, ["dog", "cat"])
    assert dataset.classes == ["dog", "cat"]
    assert {path.parent.name: label for path, label in zip(dataset.files, dataset.labels)} == {
        "dog": 0,
        "cat": 1,
    }
    with pytest.raises(ValueError, match=r"missing \['emu'\], extra \['cat'\]"):
        LabelledImageFolder(tmp_path, ["dog", "emu"])


def test_labelled_folder_needs_two_classes(tmp_path):
    _class_tree(tmp_path, {"cat": 2})
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*at least 2; found 1"):
        LabelledImageFolder(tmp_path)


def test_labelled_folder_names_a_class_without_readable_images(tmp_path):
    _class_tree(tmp_path, {"cat": 1, "dog": 0})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "x.jpg").write_text("not an image")
    with (
        pytest.warns(BadImageWarning),
        pytest.raises(
            ValueError, match=rf"{re.escape(str(tmp_path / 'dog'))}.*1 file\(s\) rejected"
        ),
    ):
        LabelledImageFolder(tmp_path)


# ---- build_dataset -------------------------------------------------------------------------


def test_build_dataset_synthetic_passes_its_arguments():
    dataset = build_dataset("synthetic", length=10, image_size=48, seed=7)
    assert isinstance(dataset, SyntheticScenes)
    assert (len(dataset), dataset.image_size, dataset.seed) == (10, 48, 7)


def test_build_dataset_treats_anything_else_as_a_folder(image_tree):
    root, _ = image_tree
    dataset = build_dataset(str(root), length=10, image_size=48, seed=7)
    assert isinstance(dataset, ImageFolder) and len(dataset) == 4
    with pytest.raises(FileNotFoundError):
        build_dataset(str(root / "missing"), length=10, image_size=48, seed=7)
