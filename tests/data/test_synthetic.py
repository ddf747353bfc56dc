"""Ground-truth consistency tests of the procedural synthetic-scene renderer and dataset."""

from __future__ import annotations

import numpy as np
import pytest

from mtl.data.synthetic import (
    CLASSES,
    NUM_PARTS,
    ROOM_CLASSES,
    SyntheticScenes,
    render_scene,
)

H, W = 96, 128
FIGURE = CLASSES.index("figure")


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [render_scene(7, i, height=H, width=W) for i in range(12)]


def test_determinism_and_streams() -> None:
    a, b = render_scene(3, 5, height=H, width=W), render_scene(3, 5, height=H, width=W)
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
    assert a["meta"]["id"] == "3_000005"
    assert not np.array_equal(a["image"], render_scene(3, 6, height=H, width=W)["image"])
    train = SyntheticScenes(split="train", length=4, resolution=(H, W))
    val = SyntheticScenes(split="val", length=4, resolution=(H, W))
    assert not np.array_equal(train[0]["image"], val[0]["image"])
    np.testing.assert_array_equal(train[1]["depth"], train[1]["depth"])


def test_dtypes_shapes_ranges(samples: list[dict]) -> None:
    for s in samples:
        assert s["image"].dtype == np.uint8 and s["image"].shape == (H, W, 3)
        for key in ("semseg", "human_parts", "saliency", "edge"):
            assert s[key].dtype == np.uint8 and s[key].shape == (H, W), key
        assert s["semseg"].max() < len(CLASSES)
        hp = s["human_parts"]
        assert (hp == 255).all() or hp.max() <= NUM_PARTS
        assert set(np.unique(s["saliency"])) <= {0, 1}
        assert set(np.unique(s["edge"])) <= {0, 1}
        assert s["normals"].dtype == np.float32 and s["normals"].shape == (H, W, 3)
        assert s["depth"].dtype == np.float32 and s["depth"].shape == (H, W)
        assert s["instance"].dtype == np.uint16 and s["instance"].shape == (H, W)
        depth, n = s["depth"], s["normals"]
        valid = depth > 0
        assert 0.5 < valid.mean() < 1.0  # some sensor holes, mostly valid
        assert np.isfinite(depth).all() and depth.max() < 15
        np.testing.assert_allclose(np.linalg.norm(n[valid], axis=-1), 1.0, atol=1e-4)
        assert (n[~valid] == 0).all()
        # Visible surfaces face the camera: n . (viewing ray) < 0 in the OpenGL camera frame.
        k = s["meta"]["K"]
        vv, uu = np.nonzero(valid)
        rays = np.stack([(uu - k[0, 2]) / k[0, 0], -(vv - k[1, 2]) / k[1, 1], -np.ones_like(uu)], 1)
        assert ((n[valid] * rays).sum(1) < 0).all()
        assert s["meta"]["size"] == (H, W)


def _backproject(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    """3-D points in the OpenGL camera frame (x right, y up, z towards the viewer)."""
    vv, uu = np.mgrid[: depth.shape[0], : depth.shape[1]]
    x = (uu - k[0, 2]) / k[0, 0] * depth
    y = (vv - k[1, 2]) / k[1, 1] * depth
    return np.stack([x, -y, -depth], -1).astype(np.float64)


def test_normals_agree_with_depth_on_room_planes(samples: list[dict]) -> None:
    angles = []
    for s in samples:
        p = _backproject(s["depth"], s["meta"]["K"])
        du = p[1:-1, 2:] - p[1:-1, :-2]  # towards +u (right)
        dv = p[2:, 1:-1] - p[:-2, 1:-1]  # towards +v (down)
        n = np.cross(dv, du)  # right x down points away from the camera; reversed here
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
        inst, depth = s["instance"].astype(int), s["depth"]
        same = np.ones((H - 2, W - 2), bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                win = (slice(1 + dy, H - 1 + dy), slice(1 + dx, W - 1 + dx))
                same &= (inst[win] == inst[1:-1, 1:-1]) & (depth[win] > 0)
        same &= np.isin(s["semseg"][1:-1, 1:-1], ROOM_CLASSES)
        gt = s["normals"][1:-1, 1:-1][same]
        cos = np.clip((n[same] * gt).sum(-1), -1, 1)
        angles.append(np.degrees(np.arccos(cos)))
    angles = np.concatenate(angles)
    assert angles.size > 1000
    assert np.median(angles) < 0.5 and np.percentile(angles, 95) < 3.0


def test_edges_lie_on_label_boundaries(samples: list[dict]) -> None:
    for s in samples:
        edge, sem, inst = s["edge"].astype(bool), s["semseg"], s["instance"]
        changed = np.zeros_like(edge)
        changed[:, :-1] |= sem[:, :-1] != sem[:, 1:]
        changed[:-1] |= sem[:-1] != sem[1:]
        assert edge[changed].all()  # every class boundary is marked
        inst_changed = np.zeros_like(edge)
        inst_changed[:, :-1] |= inst[:, :-1] != inst[:, 1:]
        inst_changed[:-1] |= inst[:-1] != inst[1:]
        np.testing.assert_array_equal(edge, inst_changed)  # and only instance changes are
        assert 0 < edge.mean() < 0.2


def test_saliency_and_human_parts(samples: list[dict]) -> None:
    n_fig = 0
    for s in samples:
        np.testing.assert_array_equal(s["saliency"] == 1, ~np.isin(s["semseg"], ROOM_CLASSES))
        fig = s["semseg"] == FIGURE
        if fig.any():
            n_fig += 1
            np.testing.assert_array_equal(s["human_parts"] > 0, fig)
        else:
            assert (s["human_parts"] == 255).all()
    assert 0 < n_fig < len(samples)


@pytest.mark.parametrize("prob", [0.0, 0.6, 1.0])
def test_figure_frequency(prob: float) -> None:
    n = 50
    hits = sum(
        (render_scene(11, i, height=48, width=64, figure_prob=prob)["semseg"] == FIGURE).any()
        for i in range(n)
    )
    if prob == 0.0:
        assert hits == 0
    else:
        assert abs(hits / n - prob) < 0.2, hits


def test_dataset_tasks_transform_and_instance() -> None:
    ds = SyntheticScenes(length=3, resolution=(32, 48), tasks=["depth", "edge"], seed=1)
    assert len(ds) == 3
    s = ds[2]
    assert set(s) == {"image", "meta", "depth", "edge"}
    assert s["depth"].shape == (32, 48)
    full = SyntheticScenes(length=2, resolution=(32, 48), return_instance=True)[0]
    assert set(full) == {"image", "meta", "instance", *SyntheticScenes.TASKS}
    tr = SyntheticScenes(length=2, resolution=(32, 48), transform=lambda d: {"n": len(d)})
    assert tr[0] == {"n": 2 + len(SyntheticScenes.TASKS)}
    assert SyntheticScenes.NUM_CLASSES == {"semseg": len(CLASSES), "human_parts": NUM_PARTS + 1}
    with pytest.raises(IndexError):
        ds[3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "dev"}, "split"),
        ({"length": 0}, "length"),
        ({"length": -3}, "length"),
        ({"resolution": (64,)}, "resolution"),
        ({"resolution": (0, 64)}, "resolution"),
        ({"resolution": (64.0, 64)}, "resolution"),
        ({"tasks": ["depth", "albedo"]}, "albedo.*semseg"),
        ({"figure_prob": 1.5}, "figure_prob"),
    ],
)
def test_dataset_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(**kwargs)


def test_unknown_scene_param() -> None:
    with pytest.raises(TypeError):
        SyntheticScenes(num_lights=3)
    with pytest.raises(TypeError):
        render_scene(0, 0, height=8, width=8, bogus=1)
