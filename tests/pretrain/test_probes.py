"""Frozen-backbone probes: known answers for patch labels and metrics, probe sanity on
separable vs. random data, feature extraction from a tiny timm ViT and a ResNet, the k-NN probe
on labelled image folders (both layouts, the deterministic split, clear errors)."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgc_pretrain.data import BadImageWarning, LabelledImageFolder
from mgc_pretrain.probes import (
    dense_linear_probe,
    extract_features,
    format_table,
    hash_split,
    knn_probe,
    patch_labels,
    probe_backbone,
    probe_image_folder,
    resize_and_centre_crop,
    segmentation_metrics,
)

timm = pytest.importorskip("timm")


def tiny_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=0
    )


# --- patch_labels ---------------------------------------------------------------------------


def test_patch_labels_left_and_right_halves():
    mask = torch.ones(1, 8, 8, dtype=torch.long)
    mask[:, :, 4:] = 2
    labels = patch_labels(mask, grid=4, num_classes=3)
    assert labels.tolist() == [[1, 1, 2, 2] * 4]


def test_patch_labels_grid_not_dividing_the_mask():
    # 10 columns in 3 adaptive cells: columns [0, 4), [3, 7), [6, 10). Class 1 fills columns
    # 0..5, so the middle cell holds three columns of class 1 and one of class 2.
    mask = torch.full((1, 10, 10), 2, dtype=torch.long)
    mask[:, :, :6] = 1
    labels = patch_labels(mask, grid=3, num_classes=3)
    assert labels.tolist() == [[1, 1, 2] * 3]


def test_patch_labels_tie_goes_to_lowest_class():
    mask = torch.tensor([[[3, 0], [0, 3]]])
    assert patch_labels(mask, grid=1, num_classes=4).tolist() == [[0]]


def brute_force_majority(mask, grid, num_classes):
    """Majority class per adaptive cell with explicit floor/ceil bin edges, counted by hand."""
    height, width = mask.shape
    labels = []
    for row in range(grid):
        top, bottom = row * height // grid, -(-(row + 1) * height // grid)
        for col in range(grid):
            left, right = col * width // grid, -(-(col + 1) * width // grid)
            counts = torch.bincount(mask[top:bottom, left:right].reshape(-1), minlength=num_classes)
            labels.append(int(counts.argmax()))
    return labels


@pytest.mark.parametrize("height, width, grid", [(11, 13, 4), (14, 14, 7), (9, 5, 3)])
def test_patch_labels_matches_counting(height, width, grid):
    generator = torch.Generator().manual_seed(height * width)
    masks = torch.randint(0, 4, (3, height, width), generator=generator)
    labels = patch_labels(masks, grid=grid, num_classes=4)
    assert labels.shape == (3, grid * grid)
    for mask, row in zip(masks, labels):
        assert row.tolist() == brute_force_majority(mask, grid, 4)


def test_patch_labels_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="mask values"):
        patch_labels(torch.full((1, 4, 4), 5), grid=2, num_classes=3)


# --- metrics and the dense probe -------------------------------------------------------------


def test_segmentation_metrics_hand_computed():
    truth = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    # class 0: TP 2, FP 0, FN 1; class 1: TP 1, FP 1, FN 1; class 2: TP 1, FP 1, FN 0;
    # class 3 absent from both -> undefined, left out of the mean.
    expected_iou = [2 / 3, 1 / 3, 1 / 2]
    metrics = segmentation_metrics(pred, truth, num_classes=4)
    assert metrics["iou"][:3] == pytest.approx(expected_iou)
    assert math.isnan(metrics["iou"][3])
    assert metrics["miou"] == pytest.approx(sum(expected_iou) / 3)
    assert metrics["patch_acc"] == pytest.approx(4 / 6)


def labelled_patches(num_images, generator, num_classes=5, patches=16):
    return torch.randint(0, num_classes, (num_images, patches), generator=generator)


def test_dense_probe_on_linearly_encoded_labels():
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(5, 32, generator=generator)
    train_y, test_y = labelled_patches(64, generator), labelled_patches(32, generator)
    train_x = prototypes[train_y] + 0.1 * torch.randn(64, 16, 32, generator=generator)
    test_x = prototypes[test_y] + 0.1 * torch.randn(32, 16, 32, generator=generator)
    result = dense_linear_probe(train_x, train_y, test_x, test_y, num_classes=5)
    assert result["miou"] > 0.95
    assert result["patch_acc"] > 0.97
    assert len(result["iou"]) == 5


def test_dense_probe_on_noise_is_near_chance():
    generator = torch.Generator().manual_seed(1)
    train_y, test_y = labelled_patches(64, generator), labelled_patches(32, generator)
    train_x = torch.randn(64, 16, 32, generator=generator)
    test_x = torch.randn(32, 16, 32, generator=generator)
    result = dense_linear_probe(train_x, train_y, test_x, test_y, num_classes=5)
    assert result["miou"] < 0.2  # chance IoU with 5 balanced classes is about 1/9
    assert result["patch_acc"] < 0.35


def test_dense_probe_is_deterministic_given_seed():
    generator = torch.Generator().manual_seed(2)
    train_y, test_y = labelled_patches(16, generator), labelled_patches(8, generator)
    train_x = torch.randn(16, 16, 8, generator=generator)
    test_x = torch.randn(8, 16, 8, generator=generator)
    first = dense_linear_probe(train_x, train_y, test_x, test_y, 5, epochs=20, seed=3)
    second = dense_linear_probe(train_x, train_y, test_x, test_y, 5, epochs=20, seed=3)
    assert first == second


def test_dense_probe_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="train_x"):
        dense_linear_probe(
            torch.randn(4, 16, 8),
            torch.zeros(4, 15, dtype=torch.long),
            torch.randn(2, 16, 8),
            torch.zeros(2, 16, dtype=torch.long),
            3,
        )


# --- k-NN ------------------------------------------------------------------------------------


def test_knn_on_separable_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=generator), dim=1) * 10
    train_y = torch.randint(0, 4, (200,), generator=generator)
    test_y = torch.randint(0, 4, (100,), generator=generator)
    train_x = centres[train_y] + torch.randn(200, 16, generator=generator)
    test_x = centres[test_y] + torch.randn(100, 16, generator=generator)
    assert knn_probe(train_x, train_y, test_x, test_y, num_classes=4) >= 0.99


def test_knn_on_random_labels_is_chance():
    generator = torch.Generator().manual_seed(1)
    train_x = torch.randn(2000, 16, generator=generator)
    test_x = torch.randn(2000, 16, generator=generator)
    train_y = torch.randint(0, 4, (2000,), generator=generator)
    test_y = torch.randint(0, 4, (2000,), generator=generator)
    assert knn_probe(train_x, train_y, test_x, test_y, num_classes=4) == pytest.approx(
        0.25, abs=0.05
    )


def test_knn_weights_votes_by_similarity_and_clips_k():
    # Three train points, k = 20 -> all three vote. The test point is the first train point's
    # direction: its own vote exp(1 / T) outweighs the two others' exp(0) + exp(0).
    train_x = torch.eye(3)
    train_y = torch.tensor([2, 0, 0])
    accuracy = knn_probe(
        train_x, train_y, torch.tensor([[1.0, 0, 0]]), torch.tensor([2]), num_classes=3
    )
    assert accuracy == 1.0


# --- features from a timm ViT ----------------------------------------------------------------


@pytest.mark.parametrize("was_training", [True, False])
def test_extract_features_shapes_and_mode(was_training):
    torch.manual_seed(0)
    backbone = tiny_vit().train(was_training)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    cls, patches = extract_features(backbone, images, image_size=32, batch_size=2)
    assert cls.shape == (5, 24) and patches.shape == (5, 16, 24)
    assert backbone.training == was_training


def test_extract_features_from_dataset_resizes_like_tensor_input():
    torch.manual_seed(0)
    backbone = tiny_vit()
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    dataset = [{"image": image} for image in images]
    from_tensor = extract_features(backbone, images, image_size=32, batch_size=2)
    from_dataset = extract_features(backbone, dataset, image_size=32, batch_size=2)
    assert from_tensor[1].shape == (3, 16, 24)
    for expected, actual in zip(from_tensor, from_dataset):
        torch.testing.assert_close(actual, expected)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def test_extract_features_from_a_resnet(resnet):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    pooled, positions = extract_features(resnet, images, image_size=64, batch_size=2)
    assert pooled.shape == (3, 512) and positions.shape == (3, 4, 512)  # a 2 x 2 final map
    torch.testing.assert_close(pooled, positions.mean(1))


class FakeScenes(torch.utils.data.Dataset):
    """Images whose colour is the image label; masks with a class-1 left half."""

    def __init__(self, size: int, seed: int):
        self.labels = torch.randint(0, 3, (size,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = int(self.labels[index])
        mask = torch.zeros(32, 32, dtype=torch.long)
        mask[:, :16] = 1
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        image[label] = 200
        return {"image": image, "mask": mask, "label": label}


def test_probe_backbone_reports_fractions():
    torch.manual_seed(0)
    result = probe_backbone(
        tiny_vit(),
        FakeScenes(20, 0),
        FakeScenes(10, 1),
        image_size=32,
        grid=4,
        num_classes=3,
        batch_size=8,
    )
    assert set(result) == {"dense_miou", "dense_patch_acc", "knn_top1"}
    assert all(0.0 <= value <= 1.0 for value in result.values())


def test_probe_backbone_on_a_resnet(resnet):
    # 64 px in, a 2 x 2 final map: each of its positions is a token of the dense probe
    result = probe_backbone(
        resnet,
        FakeScenes(12, 0),
        FakeScenes(6, 1),
        image_size=64,
        grid=2,
        num_classes=3,
        batch_size=8,
    )
    assert set(result) == {"dense_miou", "dense_patch_acc", "knn_top1"}
    assert all(0.0 <= value <= 1.0 for value in result.values())


def test_probe_backbone_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        probe_backbone(
            tiny_vit(), FakeScenes(4, 0), FakeScenes(4, 1), image_size=32, grid=7, num_classes=3
        )


# --- labelled image folders ------------------------------------------------------------------

CLASS_COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 60), "red": (220, 30, 30)}


def write_class_folders(root, per_class: int, seed: int = 0) -> None:
    """One folder per colour of noisy, non-square solid images: a random backbone's k-NN
    tells them apart."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-20, 21, size=(24, 40, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")


def test_probe_image_folder_with_train_and_val(tmp_path):
    write_class_folders(tmp_path / "train", per_class=4, seed=0)
    write_class_folders(tmp_path / "val", per_class=3, seed=1)
    truncated = tmp_path / "val" / "red" / "01.png"
    truncated.write_bytes(truncated.read_bytes()[:200])  # opens, does not decode: left out
    torch.manual_seed(0)
    with pytest.warns(BadImageWarning, match=re.escape(str(truncated))):
        result = probe_image_folder(tiny_vit(), tmp_path, image_size=32, batch_size=5, k=3)
    assert result == {
        "knn_top1": 1.0,
        "num_train": 12,
        "num_test": 8,
        "num_classes": 3,
        "bad_images": 1,
    }


def test_probe_image_folder_splits_a_single_folder(tmp_path):
    write_class_folders(tmp_path, per_class=6)
    torch.manual_seed(0)
    result = probe_image_folder(tiny_vit(), tmp_path, image_size=32, batch_size=8, k=3)
    # round(6 * 0.2) = 1 test image per class
    assert result == {
        "knn_top1": 1.0,
        "num_train": 15,
        "num_test": 3,
        "num_classes": 3,
        "bad_images": 0,
    }


def test_hash_split_is_deterministic_disjoint_and_covers_every_class(tmp_path):
    counts = {"a": 1, "b": 2, "c": 7, "d": 23}
    for name, count in counts.items():
        for i in range(count):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.new("RGB", (2, 2)).save(tmp_path / name / f"{i}.png")
    dataset = LabelledImageFolder(tmp_path)
    fit, test = hash_split(dataset)
    assert (fit, test) == hash_split(LabelledImageFolder(tmp_path))
    assert not set(fit) & set(test) and sorted(fit + test) == list(range(len(dataset)))
    test_per_class = [sum(dataset.labels[i] == label for i in test) for label in range(4)]
    assert test_per_class == [0, 1, 1, 5]  # a single image is fit only; round(n / 5) >= 1


def test_hash_split_of_a_class_ignores_other_classes(tmp_path):
    for name in ("a", "b"):
        for i in range(10):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.new("RGB", (2, 2)).save(tmp_path / name / f"{i}.png")

    def test_files_of_a():
        dataset = LabelledImageFolder(tmp_path)
        return {dataset.files[i].name for i in hash_split(dataset)[1] if dataset.labels[i] == 0}

    before = test_files_of_a()
    Image.new("RGB", (2, 2)).save(tmp_path / "b" / "extra.png")
    assert test_files_of_a() == before and len(before) == 2


def test_resize_and_centre_crop_keeps_the_middle():
    # 40 x 80 -> 20 x 40 -> the middle 20 columns, source columns 20..60; the bright band
    # reaches 4 columns further so the antialiasing filter at the crop's edge sees only it
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, :, 16:64] = 200
    crop = resize_and_centre_crop(image, 20)
    assert crop.shape == (3, 20, 20) and crop.dtype == torch.uint8
    assert (crop == 200).all()
    tall = resize_and_centre_crop(image.transpose(1, 2), 20)
    assert torch.equal(tall, crop.transpose(1, 2))


def test_probe_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        probe_image_folder(tiny_vit(), tmp_path / "missing", image_size=32)
    write_class_folders(tmp_path / "train", per_class=1)
    (tmp_path / "val" / "red").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"missing \['blue', 'green'\]"):
        probe_image_folder(tiny_vit(), tmp_path, image_size=32)
    with pytest.raises(ValueError, match="no class with 2 or more"):
        probe_image_folder(tiny_vit(), tmp_path / "train", image_size=32)


# --- table -----------------------------------------------------------------------------------


def test_format_table_aligns_percentages():
    table = format_table(
        {
            "trained": {"dense_miou": 0.4567, "dense_patch_acc": 0.8, "knn_top1": 0.91234},
            "random init": {"dense_miou": 0.1, "dense_patch_acc": 0.35, "knn_top1": float("nan")},
        }
    )
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "dense mIoU" in lines[0] and "k-NN top-1" in lines[0]
    assert lines[2].split() == ["trained", "45.7", "80.0", "91.2"]
    assert lines[3].split() == ["random", "init", "10.0", "35.0", "-"]
