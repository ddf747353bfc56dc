"""Joint transforms keep every task map aligned with the image and encode each one correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mtl.data.geometric import RandomCrop, RandomScale, rescale
from mtl.data.photometric import PhotoMetricDistortion
from mtl.data.transforms import Compose, Pad, RandomHorizontalFlip, ToTensor, build_transform

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


def test_scale_keeps_missing_depth_and_invalid_normals_and_renormalises():
    s = coordinate_sample()
    s["depth"][:, :64] = 0.0
    s["normals"][:64] = 0.0
    s["normals"][64:, :64] = (1, 0, 0)
    s["normals"][64:, 64:] = (0, 0, 1)
    out = rescale(s, 1.37)
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
    assert (out["image"][:, 128:] == 0).all() and (out["image"][:, :, 128:] == 0).all()
    for key in ("semseg", "human_parts"):
        assert (
            out[key].dtype == torch.int64
            and (out[key][128:] == 255).all()
            and (out[key][:, 128:] == 255).all()
        )
    for key in ("saliency", "edge"):
        assert (out[key][:, 128:] == 255).all() and (out[key][:, :, 128:] == 255).all()
    assert (out["depth"][:, 128:] == 0).all() and (out["normals"][:, :, 128:] == 0).all()
    torch.testing.assert_close(out["depth"][:, :128, :128], s["depth"])
    assert out["meta"]["size"] == (128, 128)  # evaluation crops the padding away with it
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
    ]
    test = build_transform(train=False, scale=(0.5, 2.0), crop=(64, 64), photometric=True, pad_to=(130, 130))
    assert [type(t).__name__ for t in test.transforms] == ["ToTensor", "Pad"]
    out = Compose(train.transforms)(coordinate_sample())
    assert out["image"].shape == (3, 64, 64) and out["normals"].shape == (3, 64, 64)
    assert test(coordinate_sample())["semseg"].shape == (130, 130)


def test_resize_to_fixed_size_keeps_maps_aligned():
    from mtl.data.geometric import Resize

    out = Resize((96, 96))(coordinate_sample())
    assert out["image"].shape == (96, 96, 3) and out["meta"]["size"] == (96, 96)
    assert_aligned(out, 96 / 128, flipped=False)
    stretched = Resize((64, 128))(coordinate_sample())
    assert all(v.shape[:2] == (64, 128) for v in stretched.values() if isinstance(v, np.ndarray))
    tf = build_transform(train=False, resize=(64, 64), pad_to=(64, 64))
    assert [type(t).__name__ for t in tf.transforms] == ["Resize", "ToTensor", "Pad"]
