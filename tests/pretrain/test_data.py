"""Datasets of the reference trainer: synthetic scenes (determinism, masks, labels that only the
shape gives away) and image folders (discovery, decoding, errors that name the file)."""
import re

import numpy as np
import pytest
import torch
from mgc_pretrain.data import ImageFolder, SyntheticScenes, build_dataset
from PIL import Image

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
    colours = torch.stack([
        s["image"].float()[:, s["mask"] == s["label"]].mean(dim=1) for s in scenes])
    labels = torch.tensor([s["label"] for s in scenes])
    half = len(scenes) // 2
    centroids = torch.stack([colours[:half][labels[:half] == c].mean(dim=0)
                             for c in range(1, SyntheticScenes.NUM_CLASSES)])
    predicted = torch.cdist(colours[half:], centroids).argmin(dim=1) + 1
    accuracy = (predicted == labels[half:]).float().mean().item()
    assert accuracy < 0.4


@pytest.mark.parametrize("index", [-1, 4])
def test_index_out_of_range(index):
    with pytest.raises(IndexError, match=str(index)):
        SyntheticScenes(length=4)[index]


@pytest.mark.parametrize("name, value", [
    ("length", 0),
    ("length", True),
    ("image_size", 31),
    ("image_size", 64.0),
    ("seed", -1),
    ("seed", "1"),
])
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
    assert png["label"] == -1
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


def test_corrupt_image_names_the_file(tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    with pytest.raises(RuntimeError, match=re.escape(str(corrupt))):
        ImageFolder(tmp_path)[0]


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
