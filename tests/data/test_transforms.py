"""Joint transforms keep every task map aligned with the image and encode each one correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mtl.data.geometric import RandomCrop, RandomScale, Resize, rescale, scaled_size
from mtl.data.photometric import PhotoMetricDistortion, PhotometricDraw
from mtl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    IgnoreUnannotatedParts,
    Pad,
    RandomHorizontalFlip,
    ToTensor,
    build_transform,
)

BLOCK, N = 16, 8  # 8×8 blocks of 16 px: a 128×128 sample


def coordinate_sample() -> dict:
    """Every map is a function of the block id b(y, x); the image's red channel stores b itself."""
    yy, xx = np.mgrid[0 : BLOCK * N, 0 : BLOCK * N]
    b = (yy // BLOCK) * N + xx // BLOCK
    angle = b * 0.05
    return {
        "image": np.stack([b * 4, np.full_like(b, 60), np.full_like(b, 200)], axis=-1).astype(np.uint8),
        "semseg": (b % 40).astype(np.uint8),
        "human_parts": (b % 7).astype(np.uint8),
        "saliency": (b % 2).astype(np.uint8),
        "edge": ((b // 2) % 2).astype(np.uint8),
        "depth": (1.0 + 0.1 * b).astype(np.float32),
        "normals": np.stack([np.sin(angle), np.zeros_like(angle), np.cos(angle)], -1).astype(np.float32),
        "meta": {"id": "coords", "size": (BLOCK * N, BLOCK * N)},
    }


def assert_aligned(s: dict, scale: float, flipped: bool, rtol: float = 1e-5) -> None:
    b_img = s["image"][..., 0].astype(np.int64)
    # interior pixels: the block id is constant in a 7×7 neighbourhood (away from resampling blur)
    interior = ndimage.maximum_filter(b_img, 7) == ndimage.minimum_filter(b_img, 7)
    interior &= b_img % 4 == 0
    assert interior.sum() > 50
    b = b_img[interior] // 4
    assert (s["semseg"][interior] == b % 40).all()
    assert (s["human_parts"][interior] == b % 7).all()
    assert (s["saliency"][interior] == b % 2).all()
    assert (s["edge"][interior] == (b // 2) % 2).all()
    np.testing.assert_allclose(s["depth"][interior] * scale, 1.0 + 0.1 * b, rtol=rtol)
    sign = -1.0 if flipped else 1.0
    expected = np.stack([sign * np.sin(b * 0.05), np.zeros(len(b)), np.cos(b * 0.05)], -1)
    np.testing.assert_allclose(s["normals"][interior], expected, atol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.0, 1.5, 2.0])
def test_scale_crop_flip_keep_all_maps_aligned(scale):
    s = rescale(coordinate_sample(), scale)
    assert s["image"].shape[:2] == (round(128 * scale),) * 2
    for key in ("semseg", "human_parts", "saliency", "edge", "depth", "normals"):
        assert s[key].shape[:2] == s["image"].shape[:2], key
    s = RandomCrop((96, 80), cat_max_ratio=0.75, seed=scale.hex().__hash__() % 1000)(s)
    expected_hw = (min(96, round(128 * scale)), min(80, round(128 * scale)))
    assert all(v.shape[:2] == expected_hw for v in s.values() if isinstance(v, np.ndarray))
    s = RandomHorizontalFlip(p=1.0)(s)
    assert_aligned(s, scale, flipped=True)


def test_random_scale_draws_in_range_and_divides_depth():
    sample = coordinate_sample()
    for seed in range(5):
        out = RandomScale((0.5, 2.0), seed=seed)(sample)
        s = out["image"].shape[0] / 128
        assert 0.5 - 1e-2 <= s <= 2.0 + 1e-2
        assert_aligned(out, s, flipped=False, rtol=0.5 / 64)  # s is known only up to the rounding of the size
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        RandomScale((2.0, 0.5))


@pytest.mark.parametrize("normals", ["nearest", "bilinear"])
def test_scale_keeps_missing_depth_and_invalid_normals_and_renormalises(normals):
    s = coordinate_sample()
    s["depth"][:, :64] = 0.0
    s["normals"][:64] = 0.0
    s["normals"][64:, :64] = (1, 0, 0)
    s["normals"][64:, 64:] = (0, 0, 1)
    out = rescale(s, 1.37, normals=normals)
    assert (out["depth"][:, : int(64 * 1.37) - 1] == 0).all()
    norm = np.linalg.norm(out["normals"], axis=-1)
    assert (norm[: int(64 * 1.37) - 1] == 0).all()
    valid = norm > 0
    np.testing.assert_allclose(norm[valid], 1.0, atol=1e-5)  # blended normals re-normalised


def test_flip_negates_normal_x_only():
    s = coordinate_sample()
    out = RandomHorizontalFlip(p=1.0)(s)
    np.testing.assert_array_equal(out["normals"][:, ::-1, 0], -s["normals"][..., 0])
    np.testing.assert_array_equal(out["normals"][:, ::-1, 1:], s["normals"][..., 1:])
    np.testing.assert_array_equal(out["image"][:, ::-1], s["image"])
    assert RandomHorizontalFlip(p=0.0)(s) is s


def test_crop_cat_max_ratio_avoids_dominated_windows():
    seg = np.zeros((100, 100), np.uint8)
    seg[:, 60:] = 1  # a 50-wide window is dominated (≥ 75 % one class) for 26 of its 51 offsets
    sample = {"image": np.zeros((100, 100, 3), np.uint8), "semseg": seg}

    def dominated_fraction(ratio: float) -> float:
        crop = RandomCrop((50, 50), cat_max_ratio=ratio, seed=0)
        outs = [crop(sample)["semseg"] for _ in range(200)]
        return np.mean([np.bincount(o.ravel(), minlength=2).max() / o.size >= 0.75 for o in outs])

    assert dominated_fraction(1.0) > 0.35
    assert dominated_fraction(0.75) < 0.05  # 10 redraws fail together with probability ~0.1 %


def test_crop_smaller_image_is_kept_whole():
    sample = {"image": np.zeros((20, 30, 3), np.uint8), "semseg": np.zeros((20, 30), np.uint8)}
    out = RandomCrop((64, 64))(sample)
    assert out["image"].shape == (20, 30, 3) and out["semseg"].shape == (20, 30)


def test_pad_values_and_error():
    s = ToTensor()(coordinate_sample())
    out = Pad((130, 140))(s)
    assert out["image"].shape == (3, 130, 140)
    # centred: 1 row above and below, 6 columns left and right (the reference's PadImage)
    pad = torch.ones(130, 140, dtype=torch.bool)
    pad[1:129, 6:134] = False
    assert (out["image"][:, pad] == 0).all()
    for key in ("semseg", "human_parts"):
        assert out[key].dtype == torch.int64 and (out[key][pad] == 255).all()
    for key in ("saliency", "edge"):
        assert (out[key][:, pad] == 255).all()
    assert (out["depth"][:, pad] == 0).all() and (out["normals"][:, pad] == 0).all()
    torch.testing.assert_close(out["depth"][:, 1:129, 6:134], s["depth"])
    torch.testing.assert_close(out["image"][:, 1:129, 6:134], s["image"])
    assert out["meta"]["size"] == (128, 128)  # evaluation crops the padding away with it
    assert out["meta"]["pad_offset"] == (1, 6)
    with pytest.raises(ValueError, match=r"sample 'coords': size 128×128 exceeds the pad size 100×140"):
        Pad((100, 140))(s)


def test_photometric_changes_only_the_image():
    s = coordinate_sample()
    changed = 0
    for seed in range(8):
        out = PhotoMetricDistortion(seed=seed)(s)
        assert out["image"].dtype == np.uint8 and out["image"].shape == s["image"].shape
        changed += int(not np.array_equal(out["image"], s["image"]))
        for key in ("semseg", "depth", "normals", "edge"):
            assert out[key] is s[key]
    assert changed >= 6


def test_photometric_hue_and_saturation_are_exact_on_grey_and_pure_colours():
    grey = {"image": np.full((4, 4, 3), 100, np.uint8)}
    for seed in range(6):  # hue and saturation leave grey alone; brightness/contrast keep it grey
        out = PhotoMetricDistortion(seed=seed)(grey)["image"]
        assert (out == out[..., :1]).all()
    red = {"image": np.zeros((2, 2, 3), np.uint8) + np.array([255, 0, 0], np.uint8)}
    shift = PhotoMetricDistortion(
        brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=60
    )
    hues = set()
    for _ in range(40):
        img = shift(red)["image"][0, 0].astype(int)
        assert img.max() == 255 and img.min() == 0  # a pure colour stays pure: only the hue moves
        hues.add(tuple(img))
    assert len(hues) > 3


def test_build_transform_train_and_test_pipelines():
    train = build_transform(train=True, scale=(0.5, 2.0), crop=(64, 64), photometric=True, pad_to=(64, 64))
    names = [type(t).__name__ for t in train.transforms]
    assert names == [
        "RandomScale",
        "RandomCrop",
        "RandomHorizontalFlip",
        "PhotoMetricDistortion",
        "ToTensor",
        "Pad",
        "IgnoreUnannotatedParts",
    ]
    test = build_transform(train=False, scale=(0.5, 2.0), crop=(64, 64), photometric=True, pad_to=(130, 130))
    assert [type(t).__name__ for t in test.transforms] == ["ToTensor", "Pad", "IgnoreUnannotatedParts"]
    out = Compose(train.transforms)(coordinate_sample())
    assert out["image"].shape == (3, 64, 64) and out["normals"].shape == (3, 64, 64)
    assert test(coordinate_sample())["semseg"].shape == (130, 130)


def test_resize_to_fixed_size_keeps_maps_aligned():
    out = Resize((96, 96))(coordinate_sample())
    assert out["image"].shape == (96, 96, 3) and out["meta"]["size"] == (96, 96)
    assert_aligned(out, 96 / 128, flipped=False)
    stretched = Resize((64, 128))(coordinate_sample())
    assert all(v.shape[:2] == (64, 128) for v in stretched.values() if isinstance(v, np.ndarray))
    tf = build_transform(train=False, resize=(64, 64), pad_to=(64, 64))
    assert [type(t).__name__ for t in tf.transforms] == [
        "Resize",
        "ToTensor",
        "Pad",
        "IgnoreUnannotatedParts",
    ]


# ---- the reference's arithmetic (Multi-Task-Transformer data/transforms.py), values derived by hand ----


def test_random_scale_truncates_the_size_like_the_reference():
    # int(10·0.77) = int(7.7) = 7 and int(15·0.77) = int(11.55) = 11 (rounding would give 8 × 12)
    assert scaled_size(10, 15, 0.77) == (7, 11)
    sample = {"image": np.zeros((10, 15, 3), np.uint8), "semseg": np.zeros((10, 15), np.uint8)}
    out = rescale(sample, 0.77)
    assert out["image"].shape == (7, 11, 3) and out["semseg"].shape == (7, 11)


def test_random_scale_resamples_the_image_in_float_and_normals_by_nearest():
    # bilinear ×2 of the row (0, 101) with half-pixel centres: sources −0.25, 0.25, 0.75, 1.25
    # → 0, 0.75·0 + 0.25·101, 0.25·0 + 0.75·101, 101 = (0, 25.25, 75.75, 101), kept in float32
    n1, n2 = np.array([1.0, 0.0, 0.0], np.float32), np.array([0.0, 0.6, 0.8], np.float32)
    sample = {
        "image": np.array([[[0, 0, 0], [101, 101, 101]]], np.uint8),
        "normals": np.stack([n1, n2])[None],
    }
    out = rescale(sample, 2.0)
    assert out["image"].dtype == np.float32
    np.testing.assert_allclose(out["image"][0, :, 0], [0.0, 25.25, 75.75, 101.0], rtol=0, atol=1e-4)
    # nearest: every normal is one of the two stored vectors (no blend, no re-normalisation)
    np.testing.assert_array_equal(out["normals"][0], np.stack([n1, n1, n2, n2]))
    # the smoother option: blend, then re-normalise (x = 0.75·1 at the second pixel, before normalising)
    blended = build_transform(train=True, hflip=0.0, scale=(2.0, 2.0), scale_normals="bilinear")(sample)
    n = blended["normals"][:, 0, 1].numpy()
    np.testing.assert_allclose(n, np.array([0.75, 0.15, 0.2]) / np.linalg.norm([0.75, 0.15, 0.2]), rtol=1e-5)
    with pytest.raises(ValueError, match="normals resampling must be one of"):
        RandomScale(normals="cubic")
    # the photometric step truncates the float image to uint8 (25.25 → 25, 75.75 → 75)
    img = PhotoMetricDistortion.apply(out["image"], PhotometricDraw())
    np.testing.assert_array_equal(img[0, :, 0], [0, 25, 75, 101])


def test_photometric_brightness_and_contrast_truncate_to_uint8():
    img = np.array([[[10, 250, 100], [3, 101, 200]]], np.uint8)
    # brightness +20.7: 30.7 → 30, 270.7 → 255 (clipped), 120.7 → 120; 23.7, 121.7, 220.7
    out = PhotoMetricDistortion.apply(img, PhotometricDraw(brightness=20.7))
    np.testing.assert_array_equal(out, [[[30, 255, 120], [23, 121, 220]]])
    # contrast ×1.25: 12.5 → 12, 312.5 → 255, 125; 3.75 → 3, 126.25 → 126, 250
    out = PhotoMetricDistortion.apply(img, PhotometricDraw(contrast=1.25))
    np.testing.assert_array_equal(out, [[[12, 255, 125], [3, 126, 250]]])
    # contrast before or after the HSV steps: (201, 0, 0), contrast ×1.5, saturation ×0.5
    # first: (255, 0, 0) → S 127 → (255, 255·128/255 = 128, 128)
    # last: (201, 101, 101) (see the saturation test) → ×1.5 = (255, 151.5 → 151, 151)
    red = np.array([[[201, 0, 0]]], np.uint8)
    first = PhotoMetricDistortion.apply(red, PhotometricDraw(contrast=1.5, saturation=0.5))
    last = PhotoMetricDistortion.apply(
        red, PhotometricDraw(contrast=1.5, saturation=0.5, contrast_first=False)
    )
    np.testing.assert_array_equal(first, [[[255, 128, 128]]])
    np.testing.assert_array_equal(last, [[[255, 151, 151]]])


def test_photometric_saturation_works_on_8bit_hsv():
    # (201, 0, 0) is H 0, S 255, V 201 in 8-bit HSV; S ×0.5 = 127.5 → 127 (truncated), and back to RGB
    # the other channels are V·(1 − S/255) = 201·128/255 = 100.89 → 101 (a float HSV gives 100.5 → 100)
    img = np.array([[[201, 0, 0]]], np.uint8)
    out = PhotoMetricDistortion.apply(img, PhotometricDraw(saturation=0.5))
    np.testing.assert_array_equal(out, [[[201, 101, 101]]])


def test_photometric_hue_shift_is_an_integer_in_the_references_range():
    # the reference draws randint(-18, 17) (both ends included) in OpenCV units of 2°
    dist = PhotoMetricDistortion(seed=0)
    shifts = {d.hue for d in (dist.draw() for _ in range(4000)) if d.hue is not None}
    assert shifts == set(range(-18, 18))
    # +10 units = 20° on pure red: (200, 200·20/60, 0) = (200, 66.7 → 67, 0)
    out = PhotoMetricDistortion.apply(np.array([[[200, 0, 0]]], np.uint8), PhotometricDraw(hue=10))
    np.testing.assert_array_equal(out, [[[200, 67, 0]]])


def test_photometric_draws_each_step_with_probability_one_half():
    dist = PhotoMetricDistortion(seed=1)
    draws = [dist.draw() for _ in range(4000)]
    for field in ("brightness", "contrast", "saturation", "hue"):
        rate = np.mean([getattr(d, field) is not None for d in draws])
        assert abs(rate - 0.5) < 0.03, field
    assert abs(np.mean([d.contrast_first for d in draws]) - 0.5) < 0.03


def test_to_tensor_normalises_in_the_references_order_of_operations():
    values = np.arange(256, dtype=np.uint8)
    img = np.stack([values, values, values], axis=-1)[None]  # 1 × 256 × 3
    out = ToTensor()({"image": img})["image"]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    expected = (img.astype(np.float32) / np.float32(255) - mean) / std  # (x / 255 − mean) / std in float32
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)


def test_pad_centres_the_sample():
    s = ToTensor()({"image": np.full((2, 3, 3), 128, np.uint8), "semseg": np.ones((2, 3), np.uint8)})
    out = Pad((5, 6))(s)  # Δh = 3 → 1 row above, 2 below; Δw = 3 → 1 column left, 2 right
    expected = torch.full((5, 6), 255)
    expected[1:3, 1:4] = 1
    torch.testing.assert_close(out["semseg"], expected)


def test_parts_maps_without_a_part_pixel_are_ignored_after_crop_and_pad():
    ignore = IgnoreUnannotatedParts()
    background_only = {"human_parts": torch.tensor([[0, 0], [255, 0]])}
    np.testing.assert_array_equal(ignore(background_only)["human_parts"], torch.full((2, 2), 255))
    with_part = {"human_parts": torch.tensor([[0, 3], [255, 0]])}
    assert ignore(with_part) is with_part
    # in the training pipeline: a crop that cuts the person away loses its parts supervision
    parts = np.zeros((40, 40), np.uint8)
    parts[:5, :5] = 2
    sample = {"image": np.zeros((40, 40, 3), np.uint8), "semseg": np.zeros((40, 40), np.uint8)}
    sample["human_parts"] = parts
    train = build_transform(train=True, hflip=0.0, crop=(10, 10), cat_max_ratio=1.0, pad_to=(10, 10))
    outs = [train(sample)["human_parts"] for _ in range(30)]
    assert any((o == 255).all() for o in outs)  # crops outside the head
    assert all((o == 255).all() or (o == 2).any() for o in outs)
    assert (
        build_transform(train=False)({**sample, "human_parts": np.zeros((40, 40), np.uint8)})["human_parts"]
        == 255
    ).all()


def test_parts_check_of_8_bit_maps_agrees_with_the_comparisons():
    """The OpenCV range test of uint8 maps decides as ``((v == 0) | (v == 255)).all()``."""
    ignore = IgnoreUnannotatedParts()
    rng = np.random.default_rng(0)
    for trial in range(40):
        values = rng.choice([0, 255], size=(7, 9))
        if trial % 2:  # one part pixel somewhere
            values[rng.integers(7), rng.integers(9)] = rng.integers(1, 255)
        array = values.astype(np.uint8)
        assert bool(((values == 0) | (values == 255)).all()) is not bool(trial % 2)
        views = (array, array[:, ::2], torch.from_numpy(array), torch.from_numpy(array).t(), array[None])
        for view in views:
            expected = bool(((view == 0) | (view == 255)).all())
            wide = view.astype(np.int64) if isinstance(view, np.ndarray) else view.long()
            assert ignore._unannotated(view) is expected
            assert ignore._unannotated(wide) is expected
