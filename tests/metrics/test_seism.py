"""SEISM boundary evaluation on hand-made cases, and its pieces against pyEdgeEval run directly."""

import numpy as np
import pytest
import torch
from pyEdgeEval import correspond_pixels, nms
from pyEdgeEval.preprocess import binary_thin

from mtl.metrics import seism
from mtl.metrics.edge_eval import SEISMEdgeF, average_precision, best_image_counts, scores_from_counts
from mtl.metrics.morphology import seg2bmap, thin
from mtl.metrics.seism import (
    THRESHOLDS,
    evaluate_image,
    evaluate_pair,
    match_counts,
    nms_8bit,
    nms_single,
    orientation,
)


def test_thresholds_are_seisms_101():
    assert len(THRESHOLDS) == 101 and THRESHOLDS[0] == 0.001 and THRESHOLDS[-1] == 0.999
    assert THRESHOLDS[1] == 0.01 and THRESHOLDS[50] == 0.5 and THRESHOLDS[99] == 0.99


def test_seg2bmap_marks_east_south_southeast_changes():
    seg = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    # (0,1): east is 2; (1,0)/(1,1): south is 3; (1,2): south 3; last row: only east counts (all 3);
    # last column: only south counts; bottom-right never
    assert (seg2bmap(seg) == expected).all()


def test_thin_hand_cases_and_agreement_with_pyedgeeval():
    square = np.zeros((9, 9), dtype=bool)
    square[2:7, 2:7] = True
    out = thin(square)
    assert out.sum() == 1 and out[4, 4]  # a filled square shrinks to its centre
    line = np.zeros((7, 12), dtype=bool)
    line[2:5, 1:11] = True  # 3-px thick bar → 1-px line, same length order
    out = thin(line)
    assert out.sum(axis=0).max() == 1 and 7 <= out.sum() <= 10
    # the documented bwmorph('thin') example (a 5×3 block with a diagonal tail) → a bent 1-px stroke
    block = np.zeros((7, 7), dtype=bool)
    block[1:-1, 2:-2] = True
    block[0, 1] = True
    expected = np.zeros((7, 7), dtype=bool)
    expected[[0, 1, 2, 3, 4], [1, 2, 3, 3, 3]] = True
    assert (thin(block) == expected).all()
    one_px = np.zeros((8, 8), dtype=bool)
    one_px[3, 1:7] = True
    assert (thin(one_px) == one_px).all()  # already thin: unchanged (idempotent)
    rng = np.random.default_rng(0)
    for _ in range(20):
        blob = rng.random((24, 24)) > 0.45
        ours, theirs = thin(blob), binary_thin(blob)
        # same Guo–Hall tables; pyEdgeEval may stop one sub-iteration early, never later
        assert (ours <= theirs).all()
        assert (thin(ours) == ours).all()


def test_orientation_is_the_normal_of_straight_edges():
    img = np.zeros((40, 40))
    img[:, 20] = 1.0  # vertical line: normal along x → 0
    assert orientation(img)[20, 20] == pytest.approx(0.0, abs=0.01)
    # diagonals (rows = y downwards): the normal of y = x is at 3π/4, of y = −x at π/4
    assert orientation(np.eye(40))[20, 20] == pytest.approx(3 * np.pi / 4, abs=0.01)
    assert orientation(np.fliplr(np.eye(40)))[20, 19] == pytest.approx(np.pi / 4, abs=0.01)
    # a horizontal line has Oxy = 0 and sign(0) = 0: Dollár's formula gives 0, not π/2 (kept as is)
    img = np.zeros((40, 40))
    img[20, :] = 1.0
    assert orientation(img)[20, 20] == 0.0


def test_nms_8bit_is_pyedgeeval_nms_on_value_over_255():
    rng = np.random.default_rng(1)
    u8 = (rng.random((30, 34)) * 255).astype(np.uint8)
    e = u8 / 255.0
    np.testing.assert_array_equal(nms_8bit(u8), nms(e, orientation(e), 1, 5, 1.01))
    with pytest.raises(ValueError, match="8-bit"):
        nms_8bit(e)


def _lines(shape, rows=(), cols=(), value=255):
    img = np.zeros(shape, dtype=np.uint8)
    for r, c0, c1 in rows:
        img[r, c0:c1] = value
    for c, r0, r1 in cols:
        img[r0:r1, c] = value
    return img


def test_prediction_equal_to_boundary_scores_one():
    seg = np.zeros((60, 80), dtype=np.int64)
    seg[15:45, 20:60] = 1
    gt = thin(seg2bmap(seg))
    pred = np.where(gt, 255, 0).astype(np.uint8)
    table = evaluate_pair(pred, seg, 0.011)
    assert (table[:, 0] == table[:, 1]).all() and (table[:, 2] == table[:, 3]).all()
    assert table[0, 1] == gt.sum()
    s = scores_from_counts(table, table[0])
    assert s["odsf"] == 1.0 and s["oisf"] == 1.0


@pytest.mark.parametrize(("shift", "matched"), [(1, True), (2, False)])
def test_shift_within_or_beyond_max_dist(shift, matched):
    shape = (100, 100)  # diagonal 141.4 px; max_dist 0.011 → 1.56 px
    gt = _lines(shape, cols=[(50, 10, 90)]) > 0
    pred = _lines(shape, cols=[(50 + shift, 10, 90)])
    table = evaluate_image(pred, gt, 0.011)
    row = table[50]
    assert row[1] == row[3] == 80
    assert (row[0] == 80) == matched and (row[0] == 0) == (not matched)


def test_known_threshold_sweep_gives_known_ods_ois_ap():
    shape = (80, 100)
    a = (20, 10, 60)  # predicted at 200/255 and in the ground truth: 50 px
    b = (60, 10, 40)  # predicted at 100/255, far from any ground truth: 30 px
    c = (60, 10, 30)  # ground truth only (column 60, rows 10..29): 20 px
    pred = np.maximum(_lines(shape, rows=[a], value=200), _lines(shape, rows=[b], value=100))
    gt = (_lines(shape, rows=[a]) | _lines(shape, cols=[c])) > 0
    table = evaluate_image(pred, gt, 0.0075)
    low, mid = table[THRESHOLDS < 100 / 255], table[(THRESHOLDS > 100 / 255) & (THRESHOLDS < 200 / 255)]
    assert (low == [50, 70, 50, 80]).all() and (mid == [50, 70, 50, 50]).all()
    assert (table[THRESHOLDS > 200 / 255] == [0, 70, 0, 0]).all()
    s = scores_from_counts(table, table[int(np.argmax(THRESHOLDS > 100 / 255))])
    r = 50 / 70
    assert s["odsf"] == pytest.approx(2 * r / (1 + r)) and s["ods_threshold"] == 0.40
    assert s["oisf"] == pytest.approx(s["odsf"])
    # SEISM AP: recalls {0 (nothing predicted: P 1), 5/7 (first P: 50/80)}, precision linear in
    # between, nothing beyond 5/7
    grid = np.arange(101) * 0.01
    assert s["ap"] == pytest.approx(0.01 * np.sum(np.where(grid <= r, 1 - 0.375 * grid / r, 0.0)))


def _direct(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> list[int]:
    """pyEdgeEval.correspond_pixels called directly, from the same generator state."""
    seism._RESEED(seism.MATCH_SEED)
    m_pred, m_gt, _, _ = correspond_pixels(pred.astype(float), gt.astype(float), max_dist)
    return [int((m_gt > 0).sum()), int(gt.sum()), int((m_pred > 0).sum()), int(pred.sum())]


def test_match_counts_equal_correspond_pixels_directly():
    assert seism._RESEED is not None  # the installed pyEdgeEval exports Random::reseed
    rng = np.random.default_rng(2)
    gt = thin(seg2bmap(rng.integers(0, 3, (12, 16)).repeat(4, 0).repeat(4, 1)))
    pred = np.roll(gt, 1, axis=1) & (rng.random(gt.shape) > 0.2)
    assert match_counts(pred, gt, 0.02).tolist() == _direct(pred, gt, 0.02)
    # every threshold of a full evaluation equals the primitives composed by hand
    u8 = (rng.random(gt.shape) * 255).astype(np.uint8)
    table = evaluate_image(u8, gt, 0.02)
    soft = nms_single(u8).astype(np.float64)
    for i in (0, 30, 50, 80):
        assert table[i].tolist() == _direct(thin(soft > THRESHOLDS[i]), gt, 0.02)
    table = evaluate_image(u8, gt, 0.02, precision="double")
    soft = nms_8bit(u8)
    for i in (0, 30, 50, 80):
        assert table[i].tolist() == _direct(thin(soft > THRESHOLDS[i]), gt, 0.02)


def test_average_precision_degenerate_and_full():
    assert average_precision(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0  # one recall: BSDS gives 0
    assert average_precision(np.array([1.0, 1.0]), np.array([0.0, 1.0])) == pytest.approx(1.01)


def _square_case():
    shape = (48, 64)
    seg = np.zeros(shape, dtype=np.int64)
    seg[12:36, 16:48] = 1
    gt_map = thin(seg2bmap(seg)).astype(np.float32)
    target = torch.full((2, 1, 56, 72), 255.0)  # padded bottom/right with 255
    target[:, :, :48, :64] = torch.from_numpy(gt_map)
    logits = torch.full((2, 1, 56, 72), -6.0)
    logits[0, 0, :48, :64] += 12 * torch.from_numpy(gt_map)
    logits[1, 0, :48, :64] += 12 * torch.from_numpy(np.roll(gt_map, 3, axis=1))
    return gt_map, logits, target


def test_metric_crops_padding_and_pools_counts():
    gt_map, logits, target = _square_case()
    m = SEISMEdgeF(max_dist=0.011, workers=0)
    m.update(logits, target)
    u8 = (255 * torch.sigmoid(logits[:, 0, :48, :64].double())).floor().to(torch.uint8).numpy()  # truncation
    tables = [evaluate_pair(u8[i], gt_map.astype(np.uint8), 0.011) for i in range(2)]
    assert int(m.n_images) == 2 and (m.counts.numpy() == tables[0] + tables[1]).all()
    expected = scores_from_counts(tables[0] + tables[1], sum(best_image_counts(t) for t in tables))
    assert {k: round(float(v), 5) for k, v in m.compute().items()} == pytest.approx(expected, abs=1e-5)
    m.update(logits, target)  # the same images again: the matcher is re-seeded, counts double exactly
    assert (m.counts.numpy() == 2 * (tables[0] + tables[1])).all()


@pytest.mark.slow
def test_worker_processes_give_the_inline_result():
    _, logits, target = _square_case()
    inline = SEISMEdgeF(max_dist=0.011, workers=0)
    inline.update(logits, target)
    pooled = SEISMEdgeF(max_dist=0.011, workers=2)
    pooled.update(logits[:1], target[:1])
    pooled.update(logits[1:], target[1:])
    assert inline.compute() == pooled.compute()
