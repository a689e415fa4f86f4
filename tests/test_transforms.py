"""Tests of mgc_kernels.transforms: crop boxes, the view-2 overlap rule, geometry, collation."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import default_collate

from mgc_kernels.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewTransform,
    box_iou,
    random_resized_crop_box,
    sample_view_boxes,
)

FAST = settings(max_examples=150, deadline=None)
SLOW = settings(max_examples=25, deadline=None)

sides = st.integers(min_value=1, max_value=2000)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def torchvision_available():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def assert_valid_box(box, height, width, ratio=(3 / 4, 4 / 3)):
    """Integer coordinates inside the image, positive area, and an aspect that some real
    (w, h) with w / h in ratio rounds to."""
    assert box.dtype == torch.float32 and box.shape == (4,)
    assert torch.equal(box, box.round())
    x0, y0, x1, y1 = box.tolist()
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    w, h = x1 - x0, y1 - y0
    assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / max(h - 0.5, 1e-9) >= ratio[0]


def coordinate_image(height, width):
    """Channel 0 holds each pixel's x centre (x + 0.5), channel 1 its y centre."""
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)])


# --- boxes -----------------------------------------------------------------------------------


@FAST
@given(height=sides, width=sides, seed=seeds)
def test_crop_box_inside_image_with_integer_corners_and_ratio(height, width, seed):
    box = random_resized_crop_box(height, width, generator=seeded(seed))
    assert_valid_box(box, height, width)


@FAST
@given(
    height=sides,
    width=sides,
    seed=seeds,
    scale_low=st.floats(0.01, 1.0),
    ratio=st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0)).map(sorted),
)
def test_crop_box_respects_custom_ranges(height, width, seed, scale_low, ratio):
    box = random_resized_crop_box(
        height, width, scale=(scale_low, 1.0), ratio=ratio, generator=seeded(seed)
    )
    assert_valid_box(box, height, width, ratio)


def test_crop_box_fallback_is_central_and_clamped_to_ratio():
    # A 1 x 100 strip fits no crop of aspect <= 4/3 with area >= 20: the fallback is the
    # centred crop of height 1 and width round(4/3) = 1.
    box = random_resized_crop_box(1, 100, generator=seeded(0))
    assert box.tolist() == [49.0, 0.0, 50.0, 1.0]
    # A tall image: full width, height trimmed to width / (3/4).
    box = random_resized_crop_box(400, 30, scale=(0.99, 1.0), generator=seeded(0))
    assert box.tolist() == [0.0, 180.0, 30.0, 220.0]


def test_box_iou_known_answers_and_broadcasting():
    a = torch.tensor([0.0, 0.0, 2.0, 1.0])
    assert box_iou(a, a) == 1
    assert box_iou(a, torch.tensor([1.0, 0.0, 3.0, 1.0])) == pytest.approx(1 / 3)
    assert box_iou(a, torch.tensor([2.0, 0.0, 3.0, 1.0])) == 0  # touching edges
    assert box_iou(a, torch.tensor([5.0, 5.0, 6.0, 6.0])) == 0
    assert box_iou(torch.tensor([0, 0, 4, 4]), torch.tensor([1, 1, 3, 3])) == 0.25  # ints promoted
    many = box_iou(
        torch.rand(3, 1, 2).repeat(1, 1, 2) + torch.tensor([0, 0, 1, 1]), torch.rand(5, 4)
    )
    assert many.shape == (3, 5)
    with pytest.raises(ValueError, match="shape"):
        box_iou(torch.zeros(3), a)


@FAST
@given(height=sides, width=sides, seed=seeds)
def test_view_boxes_overlap_or_fall_back_to_whole_image(height, width, seed):
    box1, box2 = sample_view_boxes(height, width, generator=seeded(seed))
    assert_valid_box(box1, height, width)
    whole = torch.tensor([0.0, 0.0, width, height])
    assert box_iou(box1.double(), box2.double()) > 0.2 or torch.equal(box2, whole)
    if not torch.equal(box2, whole):
        assert_valid_box(box2, height, width)


@pytest.mark.parametrize("seed", range(10))
def test_view_boxes_fallback_when_overlap_cannot_be_met(seed):
    # Same-size 447 x 447 boxes in a 1000 x 1000 image: IoU > 0.999 needs the very same box
    # (chance ~3e-6 a draw), so 3 tries fail and view 2 is the whole image.
    box1, box2 = sample_view_boxes(
        1000,
        1000,
        scale=(0.2, 0.2),
        ratio=(1, 1),
        min_iou=0.999,
        max_tries=3,
        generator=seeded(seed),
    )
    assert box1[2] - box1[0] == 447
    assert box2.tolist() == [0.0, 0.0, 1000.0, 1000.0]


def test_view_boxes_reproducible_with_generator():
    draws = [sample_view_boxes(480, 640, generator=seeded(7)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    others = {tuple(sample_view_boxes(480, 640, generator=seeded(s))[1].tolist()) for s in range(5)}
    assert len(others) > 1


# --- the transform: geometry -----------------------------------------------------------------


@SLOW
@given(
    height=st.integers(1, 300), width=st.integers(1, 300), channels=st.integers(1, 4), seed=seeds
)
def test_transform_output_shapes_and_types(height, width, channels, seed):
    transform = TwoViewTransform(size=12, photometric=False, generator=seeded(seed))
    out = transform(torch.rand(channels, height, width))
    assert set(out) == {"view1", "view2", "box1", "box2", "flip1", "flip2"}
    for view in ("view1", "view2"):
        assert out[view].shape == (channels, 12, 12) and out[view].dtype == torch.float32
    assert_valid_box(out["box1"], height, width)
    assert isinstance(out["flip1"], bool) and isinstance(out["flip2"], bool)


@pytest.mark.parametrize("seed", range(12))
def test_views_show_the_pixels_of_their_boxes(seed):
    # Every box is at least 43 px on a side, so size 16 always downsamples; away from the
    # outermost row/column (where the filter is clipped) a linear ramp is reproduced to within
    # the antialiasing filter's sampling error (~0.02 px); a wrong box or an off-by-one is >= 0.5.
    size = 16
    transform = TwoViewTransform(size=size, photometric=False, generator=seeded(seed))
    out = transform(coordinate_image(96, 128))
    for i in (1, 2):
        x0, y0, x1, y1 = out[f"box{i}"].tolist()
        centres = torch.arange(size, dtype=torch.float32) + 0.5
        expected_x = x0 + centres * (x1 - x0) / size
        expected_y = y0 + centres * (y1 - y0) / size
        view = out[f"view{i}"]
        x_map = view[0].flip(-1) if out[f"flip{i}"] else view[0]
        inner = slice(1, -1)
        close = {"atol": 0.05, "rtol": 0.0}
        torch.testing.assert_close(
            x_map[inner, inner], expected_x[inner].expand(size - 2, -1), **close
        )
        torch.testing.assert_close(
            view[1][inner, inner], expected_y[inner, None].expand(-1, size - 2), **close
        )
        assert x_map.mean().item() == pytest.approx((x0 + x1) / 2, abs=0.05)


def test_flips_reverse_the_x_gradient_and_both_occur():
    transform = TwoViewTransform(size=8, photometric=False, generator=seeded(0))
    outs = [transform(coordinate_image(50, 60)) for _ in range(8)]
    flips = [out["flip1"] for out in outs]
    assert any(flips) and not all(flips)
    for out, flip in zip(outs, flips):
        steps = out["view1"][0].diff(dim=-1)
        assert (steps < 0).all() if flip else (steps > 0).all()


def test_uint8_images_stay_uint8():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = TwoViewTransform(size=16, photometric=False, generator=seeded(1))(img)
    assert out["view1"].dtype == torch.uint8 and out["view2"].shape == (3, 16, 16)
    whole = TwoViewTransform(size=50, scale=(1, 1), ratio=(1.25, 1.25), photometric=False)
    assert torch.equal(whole(img)["box1"], torch.tensor([0.0, 0.0, 50.0, 40.0]))


def test_transform_reproducible_with_generator():
    img = torch.rand(3, 64, 80)
    a, b = (
        TwoViewTransform(size=16, photometric=False, generator=seeded(3))(img) for _ in range(2)
    )
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))


def test_default_collate_gives_batched_boxes_and_flips():
    transform = TwoViewTransform(size=8, photometric=False, generator=seeded(0))
    batch = default_collate([transform(torch.rand(3, 30, 40)) for _ in range(5)])
    for i in (1, 2):
        assert batch[f"box{i}"].shape == (5, 4) and batch[f"box{i}"].dtype == torch.float32
        assert batch[f"flip{i}"].shape == (5,) and batch[f"flip{i}"].dtype == torch.bool
        assert batch[f"view{i}"].shape == (5, 3, 8, 8)


# --- the transform: photometric part ---------------------------------------------------------


def assert_clear_import_error():
    with pytest.raises(ImportError) as info:
        TwoViewTransform()
    message = str(info.value)
    assert (
        "torchvision" in message
        and "mgc_kernels[train]" in message
        and "photometric=False" in message
    )


def test_photometric_pipeline_or_clear_import_error():
    if not torchvision_available():
        assert_clear_import_error()
        return
    # A black image stays black under jitter, grayscale, blur and solarize (0 < threshold), so
    # every view is exactly -mean / std per channel after normalisation.
    expected = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None, None].expand(
        3, 16, 16
    )
    from PIL import Image  # installed with torchvision

    transform = TwoViewTransform(size=16)
    for img in (
        torch.zeros(3, 40, 50, dtype=torch.uint8),
        torch.zeros(3, 40, 50),
        Image.new("RGB", (50, 40)),
    ):
        for _ in range(5):
            out = transform(img)
            for view in ("view1", "view2"):
                assert out[view].dtype == torch.float32
                torch.testing.assert_close(out[view], expected)
    noisy = transform(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert noisy["view1"].shape == (3, 16, 16) and torch.isfinite(noisy["view2"]).all()
    with pytest.raises(ValueError, match="3 .RGB. channels"):
        transform(torch.zeros(1, 40, 50))
    # Geometry on PIL images matches the tensor path pixel for pixel.
    pixels = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    pil_out, tensor_out = (
        TwoViewTransform(size=16, photometric=False, generator=seeded(5))(img)
        for img in (Image.fromarray(pixels.permute(1, 2, 0).numpy()), pixels)
    )
    assert (
        torch.equal(pil_out["box2"], tensor_out["box2"]) and pil_out["flip2"] == tensor_out["flip2"]
    )
    pil_view = torch.from_numpy(np.asarray(pil_out["view2"]).copy()).permute(2, 0, 1).int()
    assert (pil_view - tensor_out["view2"].int()).abs().max() <= 1


def test_missing_torchvision_gives_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    assert_clear_import_error()
    assert TwoViewTransform(photometric=False).size == 224  # geometry only still works


def test_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, mgc_kernels.transforms\n"
        "loaded = [m for m in ('torchvision', 'timm', 'PIL') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"size": 0}, "size"),
        ({"size": 2.5}, "size"),
        ({"scale": (0.8, 0.2)}, "scale"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.2,)}, "scale"),
        ({"ratio": (4 / 3, 3 / 4)}, "ratio"),
        ({"ratio": (-1.0, 1.0)}, "ratio"),
        ({"min_iou": 1.0}, "min_iou"),
        ({"min_iou": -0.1}, "min_iou"),
        ({"max_tries": 0}, "max_tries"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        TwoViewTransform(photometric=False, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_bad_arguments_of_functions():
    with pytest.raises(ValueError, match="height"):
        random_resized_crop_box(0, 10)
    with pytest.raises(ValueError, match="max_tries"):
        sample_view_boxes(10, 10, max_tries=0)
    with pytest.raises(TypeError, match="generator"):
        sample_view_boxes(10, 10, generator=0)


@pytest.mark.parametrize(
    "img, error, words",
    [
        (torch.zeros(10, 10), ValueError, "3 dims"),
        (torch.zeros(1, 3, 10, 10), ValueError, "3 dims"),
        (torch.zeros(3, 0, 10), ValueError, "empty"),
        (torch.zeros(3, 10, 10, dtype=torch.int32), TypeError, "dtype"),
        ([[0.0]], TypeError, "list"),
    ],
)
def test_bad_images(img, error, words):
    with pytest.raises(error, match=words):
        TwoViewTransform(photometric=False)(img)
