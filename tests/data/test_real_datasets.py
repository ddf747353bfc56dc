"""NYUD-v2 and PASCAL-Context loaders on tiny roots written in the exact real formats."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.io
from PIL import Image
from scipy import ndimage

from mtl.data.base import BadSampleError
from mtl.data.fake import parts_mat, write_nyud, write_pascal
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext, edges_from_label_map, normals_valid_classes


@pytest.fixture
def nyud(tmp_path):
    return write_nyud(tmp_path / "NYUDv2", n_train=2, n_val=1, size=(8, 10))


@pytest.fixture
def pascal(tmp_path):
    return write_pascal(tmp_path / "PASCALContext", n_train=2, n_val=1, size=(12, 14))


def _png(path, arr):
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def test_nyud_encodings(nyud):
    sid = "000000"
    seg = np.zeros((8, 10), np.uint8)
    seg[:, 1], seg[:, 2] = 1, 40  # 0 → 255 (unlabelled), 1 → 0, 40 → 39
    _png(nyud / "segmentation" / f"{sid}.png", seg)
    nrm = np.full((8, 10, 3), 255, np.uint8)
    nrm[0, 0] = 0  # stored zero vector → invalid
    nrm[0, 1] = 128  # decodes to ~0 → invalid
    nrm[0, 2] = (128, 128, 0)  # (0, 0, -1)
    _png(nyud / "normals" / f"{sid}.png", nrm)
    edge = np.zeros((8, 10), np.uint8)
    edge[3] = 255
    _png(nyud / "edge" / f"{sid}.png", edge)
    depth = np.linspace(0, 5, 80, dtype=np.float32).reshape(8, 10)
    np.save(nyud / "depth" / f"{sid}.npy", depth)

    s = NYUDv2(root=nyud, split="train", ignore_black_normals=True)[0]
    assert s["meta"] == {"id": sid, "size": (8, 10)}
    assert s["image"].dtype == np.uint8 and s["image"].shape == (8, 10, 3)
    assert s["semseg"].dtype == np.uint8
    assert (
        (s["semseg"][:, 0] == 255).all()
        and (s["semseg"][:, 1] == 0).all()
        and (s["semseg"][:, 2] == 39).all()
    )
    np.testing.assert_array_equal(s["normals"][0, 0], 0)
    np.testing.assert_array_equal(s["normals"][0, 1], 0)
    np.testing.assert_allclose(s["normals"][0, 2], (2 * 128 / 255 - 1, 2 * 128 / 255 - 1, -1), atol=1e-6)
    np.testing.assert_allclose(s["normals"][5, 5], (1, 1, 1))  # decoded as stored: 2·255/255 − 1
    assert s["edge"].dtype == np.uint8 and s["edge"].sum() == 10 and (s["edge"][3] == 1).all()
    np.testing.assert_array_equal(s["depth"], depth)


def test_nyud_task_subset_and_errors(nyud):
    ds = NYUDv2(root=nyud, split="val", tasks=["depth"])
    assert set(ds[0]) == {"image", "depth", "meta"}
    with pytest.raises(ValueError, match="unknown task.*'saliency'"):
        NYUDv2(root=nyud, split="val", tasks=["saliency"])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        NYUDv2(root=nyud, split="test")
    with pytest.raises(FileNotFoundError, match="paths.data_dir"):
        NYUDv2(root=nyud / "nope", split="val")


def test_nyud_recognises_the_480x640_copy(nyud):
    _png(nyud / "images" / "000000.png", np.zeros((480, 640, 3)))
    with pytest.raises(BadSampleError, match="480×640 MTI-Net copy") as err:
        NYUDv2(root=nyud, split="train")[0]
    assert "000000" in str(err.value) and "images/000000.png" in str(err.value)


def test_bad_label_value_is_named(nyud):
    _png(nyud / "segmentation" / "000001.png", np.full((8, 10), 41))
    with pytest.raises(BadSampleError, match=r"segmentation/000001.png: stored label 41 > 40"):
        NYUDv2(root=nyud, split="train")[1]


def test_missing_file_raises_with_id_and_path_or_is_skipped(nyud, caplog):
    (nyud / "depth" / "000000.npy").unlink()
    with pytest.raises(BadSampleError) as err:
        NYUDv2(root=nyud, split="train")[0]
    assert (
        "'000000'" in str(err.value) and "depth/000000.npy" in str(err.value) and "missing" in str(err.value)
    )

    ds = NYUDv2(root=nyud, split="train", skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        sample = ds[0]
    assert sample["meta"]["id"] == "000001" and ds.skipped == ["000000"]
    assert "depth/000000.npy" in caplog.text

    (nyud / "images" / "000001.png").write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="consecutive bad samples"):
        ds[0]


def test_pascal_encodings(pascal):
    sid, h, w = "2008_000000", 12, 14
    label_map = np.full((h, w), 2, np.uint16)  # 2 is not a normals-valid class
    valid_cls = int(np.flatnonzero(normals_valid_classes())[0])
    label_map[:, 7:] = valid_cls
    scipy.io.savemat(pascal / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": label_map})
    sal = np.zeros((h, w), np.uint8)
    sal[0, 0], sal[0, 1] = 127, 128  # value/255 > 0.5 → salient
    _png(pascal / "sal_distill" / f"{sid}.png", sal)
    seg = np.zeros((h, w), np.uint8)
    seg[0, :3] = (20, 255, 7)
    _png(pascal / "semseg" / "pascal-context" / f"{sid}.png", seg)

    s = PASCALContext(root=pascal, split="train")[0]
    assert s["saliency"][0, 0] == 0 and s["saliency"][0, 1] == 1
    assert tuple(s["semseg"][0, :3]) == (20, 255, 7)
    assert (np.abs(s["normals"][:, :7]).sum(-1) == 0).all()  # invalid context class → ignored
    assert (np.abs(s["normals"][:, 7:]).sum(-1) > 0).all()
    # edges: the boundary between columns 6 and 7, thinned to one pixel per row
    edge = s["edge"]
    assert set(np.unique(edge)) <= {0, 1}
    assert (edge[:, :6] == 0).all() and (edge[:, 8:] == 0).all()
    assert (edge[1:-1, 6:8].sum(axis=1) == 1).all()


def test_edges_from_label_map_match_laplacian_boundaries():
    lm = np.zeros((20, 20), np.int64)
    lm[5:15, 5:15] = 3
    edge = edges_from_label_map(lm)
    inside, outside = np.zeros_like(lm, bool), np.zeros_like(lm, bool)
    inside[6:14, 6:14] = True
    outside[:4], outside[16:], outside[:, :4], outside[:, 16:] = True, True, True, True
    assert edge[inside].sum() == 0 and edge[outside].sum() == 0
    # a closed contour: the 4-connected non-edge regions inside and outside are separate
    regions, _ = ndimage.label(edge == 0)
    assert regions[10, 10] != regions[0, 0]
    assert (edge[7:13].sum(axis=1) == 2).all()  # one pixel thick on the left and right sides
    assert edges_from_label_map(np.full((6, 6), 7)).sum() == 0


def test_pascal_human_parts_from_mat(pascal):
    h, w = 12, 14
    person = np.zeros((h, w), bool)
    person[2:10, 2:8] = True
    head, lfoot = np.zeros_like(person), np.zeros_like(person)
    head[2:4, 2:8], lfoot[8:10, 2:4] = True, True
    objects = [
        {"class": "person", "class_ind": 15, "mask": person, "parts": [("hair", head), ("lfoot", lfoot)]},
        {"class": "dog", "class_ind": 12, "mask": ~person, "parts": [("head", ~person)]},
    ]
    path = pascal / "human_parts" / "2008_000000.mat"
    scipy.io.savemat(path, parts_mat(objects))
    parts = PASCALContext(root=pascal, split="train", tasks=["human_parts"])[0]["human_parts"]
    expected = np.zeros((h, w), np.uint8)
    expected[head], expected[lfoot] = 1, 6  # the dog's parts are not person parts
    np.testing.assert_array_equal(parts, expected)

    # a person without parts only: the task is ignored for the image
    scipy.io.savemat(path, parts_mat([{"class": "person", "class_ind": 15, "mask": person, "parts": []}]))
    parts = PASCALContext(root=pascal, split="train", tasks=["human_parts"])[0]["human_parts"]
    assert (parts == 255).all()

    scipy.io.savemat(
        path, parts_mat([{"class": "person", "class_ind": 15, "mask": person, "parts": [("wing", head)]}])
    )
    with pytest.raises(BadSampleError, match="unknown part name 'wing'"):
        PASCALContext(root=pascal, split="train", tasks=["human_parts"])[0]


def test_pascal_fake_root_has_people_and_no_people(pascal):
    ds = PASCALContext(root=pascal, split="train")
    with_person, without = ds[0], ds[1]
    assert set(np.unique(with_person["human_parts"])) == set(range(7))
    assert (without["human_parts"] == 255).all()
    for s in (with_person, without):
        for task in PASCALContext.TASKS:
            assert s[task].shape[:2] == s["image"].shape[:2]


def test_pascal_semseg_out_of_range(pascal):
    _png(pascal / "semseg" / "pascal-context" / "2008_000001.png", np.full((12, 14), 21))
    with pytest.raises(BadSampleError, match="2008_000001.png: expected a single-channel map of 0..20"):
        PASCALContext(root=pascal, split="train", tasks=["semseg"])[1]


def test_pascal_val_carries_the_label_map_for_exact_edge_evaluation(pascal):
    import torch

    from mtl.data.transforms import build_transform
    from mtl.metrics import SEISMEdgeF
    from mtl.metrics.edge_eval import to_8bit
    from mtl.metrics.seism import evaluate_pair

    assert "edge_labelmap" not in PASCALContext(root=pascal, split="train")[0]
    raw = PASCALContext(root=pascal, split="val")[0]
    lm = scipy.io.loadmat(pascal / "pascal-context" / "trainval" / f"{raw['meta']['id']}.mat")["LabelMap"]
    np.testing.assert_array_equal(raw["edge_labelmap"], lm)
    s = build_transform(train=False, pad_to=(16, 16))(raw)
    top, left = s["meta"]["pad_offset"]  # centred: (2, 1)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[top : top + 12, left : left + 14] = True
    assert s["edge_labelmap"].dtype == torch.int64 and (s["edge_labelmap"][~inside] == -1).all()
    # the exact metric draws PASCAL's ground truth from the LabelMap, not from the thinned edge map
    logits = torch.randn(1, 1, 16, 16)
    metric = SEISMEdgeF(max_dist=0.0075)
    metric.update(logits, s["edge"][None], label_map=s["edge_labelmap"][None])
    crop = logits[0, 0, top : top + 12, left : left + 14]
    pred_u8 = to_8bit(crop).numpy()  # the metric's 8-bit quantisation (mtl.metrics.edge_eval)
    expected = evaluate_pair(pred_u8, lm.astype(np.int32), 0.0075)
    np.testing.assert_array_equal(metric.counts.numpy(), expected)


# ---- decoding as the Multi-Task-Transformer loaders (data/nyud.py, data/pascal_context.py) ----


def test_nyud_normals_decode_every_pixel_as_the_reference(nyud):
    sid = "000000"
    nrm = np.full((8, 10, 3), 255, np.uint8)
    nrm[0, 0] = 0  # decodes to (−1, −1, −1): a valid target for the field's loader and loss
    nrm[0, 1] = 128  # 2·128/255 − 1 ≈ 1/255 per component, also kept
    _png(nyud / "normals" / f"{sid}.png", nrm)
    s = NYUDv2(root=nyud, split="train", tasks=["normals"])[0]
    np.testing.assert_array_equal(s["normals"][0, 0], (-1, -1, -1))
    # (2·v) / 255 − 1 in float32, in that order: the same bits as the reference's decoding
    expected = np.float32(2) * np.float32(128) / np.float32(255) - np.float32(1)
    np.testing.assert_array_equal(s["normals"][0, 1], (expected,) * 3)
    v = np.arange(256, dtype=np.float32)
    nrm = np.stack([v.astype(np.uint8)] * 3, axis=-1)[None].repeat(8, 0)[:, :10]
    _png(nyud / "normals" / f"{sid}.png", nrm)
    got = NYUDv2(root=nyud, split="train", tasks=["normals"])[0]["normals"][0, :, 0]
    np.testing.assert_array_equal(got, np.float32(2) * v[:10] / np.float32(255) - np.float32(1))


def test_pascal_saliency_thresholds_the_stored_value_not_a_palette_colour(pascal):
    sid, h, w = "2008_000000", 12, 14
    sal = Image.fromarray(np.zeros((h, w), np.uint8), mode="P")
    stored = np.zeros((h, w), np.uint8)
    stored[0, :3] = (1, 128, 127)
    sal = Image.fromarray(stored, mode="P")
    sal.putpalette([0, 0, 0] + [255, 255, 255] * 255)  # index 1..255 drawn white
    sal.save(pascal / "sal_distill" / f"{sid}.png")
    s = PASCALContext(root=pascal, split="train", tasks=["saliency"])[0]["saliency"]
    # the reference reads the stored index: 1/255 and 127/255 ≤ 0.5 → 0, 128/255 > 0.5 → 1
    assert tuple(s[0, :3]) == (0, 1, 0) and s[1:].sum() == 0
    _png(pascal / "sal_distill" / f"{sid}.png", np.zeros((h, w, 3)))
    with pytest.raises(BadSampleError, match="expected a single-channel png"):
        PASCALContext(root=pascal, split="train", tasks=["saliency"])[0]


def test_pascal_semseg_prefers_voc12_labels_when_present(pascal):
    sid, h, w = "2008_000000", 12, 14
    _png(pascal / "semseg" / "pascal-context" / f"{sid}.png", np.full((h, w), 3))
    voc = np.full((h, w), 5, np.uint8)
    voc[0, 0] = 255
    (pascal / "semseg" / "VOC12").mkdir(parents=True)
    _png(pascal / "semseg" / "VOC12" / f"{sid}.png", voc)
    ds = PASCALContext(root=pascal, split="train", tasks=["semseg"])
    np.testing.assert_array_equal(ds[0]["semseg"], voc)
    assert ds.path("semseg", sid).parent.name == "VOC12"
    assert (ds[1]["semseg"] != 255).any() and ds.path("semseg", "2008_000001").parent.name == "pascal-context"


def test_pascal_edges_are_thinned_until_nothing_changes():
    from mtl.data import pascal_context

    # a 3-pixel L: no pixel is deletable in the first sub-iteration (both ends are end points, the
    # corner fails G3: its east neighbour is set), the corner is in the second (G3': its west neighbour
    # is unset); pyEdgeEval's binary_thin stops after the first and keeps the corner
    corner = np.zeros((5, 5), bool)
    corner[1, 1], corner[1, 2], corner[2, 1] = True, True, True
    expected = corner.copy()
    expected[1, 1] = False
    np.testing.assert_array_equal(pascal_context.thin(corner), expected)
    # a label map whose Laplacian boundary thins to two pixels (the early stop leaves three)
    lm = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(edges_from_label_map(lm), [[0, 0, 0], [0, 1, 0], [1, 0, 0]])
