"""Parity with the field's evaluators on the cases where the project used to differ.

References: Multi-Task-Transformer (``TaskPrompter/evaluation/*``, ``utils/utils.py``, the ATRC /
ASTMT meters) and SEISM (github.com/jponttuset/seism: ``read_one_cont_png.m``,
``edgesNmsMex.cpp``, ``gather_measure.m``, ``general_ois.m``, ``general_ap.m``). Every expected
value below is derived by hand from those definitions (closed forms in the comments), never by
running their code.
"""

import math

import numpy as np
import pytest
import torch

from mtl.metrics import ConfusionMatrixMetric, DepthMetric, NormalsMetric, SaliencyMaxF, SEISMEdgeF
from mtl.metrics.edge_eval import average_precision, best_image_counts, scores_from_counts, to_8bit
from mtl.metrics.morphology import seg2bmap, thin
from mtl.metrics.seism import THRESHOLDS, evaluate_image, nms_8bit, nms_single
from mtl.tasks import HumanParts

T = {round(float(t), 3): i for i, t in enumerate(THRESHOLDS)}  # threshold value → index


def _f(p: float, r: float, beta2: float = 1.0) -> float:
    return (1 + beta2) * p * r / (beta2 * p + r)


# ---------------------------------------------------------------- mIoU: absent classes count 0


def test_miou_counts_classes_absent_from_prediction_and_ground_truth_as_zero():
    # 4 classes; only 0 and 1 occur. Rows gt, columns pred: [[2, 1], [1, 3]] (7 pixels) + 1 ignored
    gt = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 255]])[None]
    pr = torch.tensor([[0, 0, 1, 0, 1, 1, 1, 3]])[None]
    m = ConfusionMatrixMetric(4)
    m.update(pr, gt)
    out = m.compute()
    iou0, iou1 = 2 / (3 + 3 - 2), 3 / (4 + 4 - 3)  # TP / (TP + FP + FN)
    assert out["miou"].item() == pytest.approx((iou0 + iou1 + 0 + 0) / 4)  # the field: all 4 classes
    assert out["miou_present"].item() == pytest.approx((iou0 + iou1) / 2)  # beside it
    assert out["iou_2"].item() == 0.0 and out["iou_3"].item() == 0.0


def test_human_parts_image_without_part_pixels_does_not_count():
    # the field's AddIgnoreRegions makes a map of only background / ignore all-ignore
    task = HumanParts(num_classes=7)
    m = task.metric()
    target = torch.tensor([[[0, 0, 0, 255]], [[0, 1, 1, 2]]])  # image 0: no part pixel
    logits = torch.zeros(2, 7, 1, 4)
    logits[0, 3] = 1.0  # image 0 predicts part 3 everywhere: would be 3 FN of class 0, 3 FP of 3
    logits[1, 0, 0, 0] = logits[1, 1, 0, 1] = logits[1, 1, 0, 2] = logits[1, 2, 0, 3] = 1.0  # perfect
    task.update_metric(m, logits, {"human_parts": target})
    out = m.compute()
    # only image 1 counts: classes 0, 1, 2 have IoU 1, classes 3..6 are absent (IoU 0)
    assert out["miou"].item() == pytest.approx(3 / 7)
    assert out["iou_3"].item() == 0.0 and int(m.confmat.sum()) == 4


# ---------------------------------------------------------------- depth: non-positive predictions


def test_depth_non_positive_predictions_count_as_1e9_in_every_term():
    pred = torch.tensor([-1.0, 0.0, 2.0, 3.0, 5.0]).view(1, 1, 1, 5)
    gt = torch.tensor([1.0, 2.0, 2.0, 0.0, 90.0]).view(1, 1, 1, 5)  # 0: missing; 90 ≥ 80: out of range
    m = DepthMetric()
    m.update(pred, gt)
    out = m.compute()
    p, g = np.array([1e-9, 1e-9, 2.0]), np.array([1.0, 2.0, 2.0])  # clamp ≥ 0, then ≤ 0 → 1e-9
    assert out["rmse"].item() == pytest.approx(math.sqrt(((p - g) ** 2).mean()), rel=1e-6)
    assert out["abs_rel"].item() == pytest.approx((np.abs(p - g) / g).mean(), rel=1e-6)
    assert out["sq_rel"].item() == pytest.approx((((p - g) ** 2) / g).mean(), rel=1e-6)
    assert out["log_rmse"].item() == pytest.approx(math.sqrt(((np.log(p) - np.log(g)) ** 2).mean()), rel=1e-6)
    # in closed form: rmse = √((1 + 4) / 3) to 1e-9, abs_rel = (1 + 1 + 0) / 3
    assert out["rmse"].item() == pytest.approx(math.sqrt(5 / 3), rel=1e-6)
    assert out["abs_rel"].item() == pytest.approx(2 / 3, rel=1e-6)


# ---------------------------------------------------------------- normals: the field's 255


def test_normals_ground_truth_with_255_is_invalid():
    gt = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [255.0, 255.0, 255.0], [0.0, 255.0, 0.0]])
    pred = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    m = NormalsMetric()
    m.update(pred.T.reshape(1, 3, 1, 4), gt.T.reshape(1, 3, 1, 4))
    out = m.compute()
    assert int(m.count) == 2  # the 255 pixels (all channels, or any one) are left out
    assert out["mean"].item() == pytest.approx(45.0, abs=1e-6)  # angles 0° and 90°
    assert out["within_11_25"].item() == pytest.approx(50.0)


# ---------------------------------------------------------------- saliency: ≥, the field's 2nd sigmoid


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).view(1, 1, 1, -1).float()


def test_saliency_threshold_ties_are_positive():
    # p = 0.5 exactly (logit 0) sits on the threshold 0.5: positive there (≥)
    logits = torch.tensor([0.0, float(_logit([0.47]).item())]).view(1, 1, 1, 2)
    gt = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    m = SaliencyMaxF()
    m.update(logits, gt)
    # t = 0.5: {0.5} → P = R = 1 → F = 1 (with '>' the best would be t = 0.45: P 1/2, R 1 → 0.565)
    assert m.compute()["maxf_prob"].item() == pytest.approx(1.0)
    # the field's meter on the second sigmoid: q = σ(0) = 0.5 ≥ 0.5 counts at threshold 0.5
    m = SaliencyMaxF(thresholds=[0.5])
    logits = torch.tensor([-200.0, float(_logit([0.3]).item()), float(_logit([0.9]).item())]).view(1, 1, 1, 3)
    m.update(logits, torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 1, 3))  # q = 0.5, 0.574, 0.711
    # '≥': all three positive → P 2/3, R 1; ('>' would drop q = 0.5: P 1/2, R 1/2 → 0.5)
    assert m.compute()["maxf"].item() == pytest.approx(_f(2 / 3, 1.0, 0.3), abs=1e-6)


def test_saliency_maxf_is_the_fields_second_sigmoid():
    # p = 0.52 (salient), 0.43 (not): q = σ(p) = 0.6271, 0.6059 — both ≥ 0.6, none ≥ 0.65
    logits, gt = _logit([0.52, 0.43]), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    m = SaliencyMaxF()
    m.update(logits, gt)
    out = m.compute()
    # field: best at t ≤ 0.6 with both positive: P 1/2, R 1 → 1.3·0.5 / (0.15 + 1)
    assert out["maxf"].item() == pytest.approx(0.65 / 1.15, abs=1e-6)
    # on the probability itself, t = 0.45 or 0.5 separates them: F = 1
    assert out["maxf_prob"].item() == pytest.approx(1.0)
    # the thresholds are torch.arange(0.05, 1, 0.05) in float32: the 12th is 0.59999996
    assert len(m.thresholds) == 19 and m.thresholds[11].item() == pytest.approx(0.59999996, abs=1e-8)


# ---------------------------------------------------------------- edge maps: 8-bit truncation


def test_edge_maps_are_truncated_to_8_bits():
    # 255·p = 127.6 and 0.4: truncated to 127 and 0 (rounding would give 128 and 0)
    logits = _logit([127.6 / 255, 0.4 / 255, 254.9 / 255])[0, 0, 0]
    assert to_8bit(logits).tolist() == [127, 0, 254]


def test_truncation_moves_the_threshold_where_a_boundary_disappears():
    seg = np.zeros((48, 64), dtype=np.int64)
    seg[12:36, 16:48] = 1
    gt = thin(seg2bmap(seg))
    logits = torch.full((1, 1, *gt.shape), -20.0)
    logits[0, 0][torch.from_numpy(gt)] = float(_logit([127.6 / 255]).item())
    m = SEISMEdgeF(max_dist=0.011)
    m.update(logits, torch.from_numpy(seg2bmap(seg).astype(np.float32))[None, None])
    counts = m.counts.numpy()
    # 127/255 = 0.498: predicted at t = 0.49, not at t = 0.50 (round(127.6) = 128 would still be)
    assert counts[T[0.49], 3] == gt.sum() and counts[T[0.5], 3] == 0


# ---------------------------------------------------------------- SEISM: single precision


def _line(shape, row=None, col=None, value=255, span=(10, 30)):
    img = np.zeros(shape, dtype=np.uint8)
    if row is not None:
        img[row, span[0] : span[1]] = value
    else:
        img[span[0] : span[1], col] = value
    return img


def test_maps_are_single_precision_compared_by_value_with_the_thresholds():
    # 51/255 = 0.2 exactly; im2single gives float32 0.20000000298 > 0.2: predicted at t = 0.2
    pred = _line((40, 40), col=20, value=51)
    gt = pred > 0
    single = evaluate_image(pred, gt, 0.011)
    double = evaluate_image(pred, gt, 0.011, precision="double")
    assert single[T[0.2], 3] == 20 and single[T[0.21], 3] == 0
    assert double[T[0.2], 3] == 0 and double[T[0.19], 3] == 20


def test_border_taper_is_single_precision():
    # a saturated column at x = 1 is tapered by float(1)/float(5): float32 0.2 × 1 > 0.2
    pred = _line((40, 40), col=1, value=255)
    soft = nms_single(pred)
    assert soft.dtype == np.float32 and soft[20, 1] == np.float32(0.2)
    assert evaluate_image(pred, pred > 0, 0.011)[T[0.2], 3] == 20
    assert nms_8bit(pred)[20, 1] == 0.2  # double: exactly 0.2, not above it


def test_nms_keeps_a_pixel_on_an_exact_suppression_tie():
    # a horizontal line (orientation exactly 0) alternating 100/255 and 101/255: a 100 pixel has
    # its neighbours along the normal... of the line: the line itself (x ± 1) at 101/255, and
    # float32(100/255) · float32(1.01) == float32(101/255): not below → kept (edgesNmsMex);
    # pyEdgeEval's double port (m = 1.00999999) suppresses it
    pred = np.zeros((40, 60), dtype=np.uint8)
    pred[20, 10:50] = np.where(np.arange(40) % 2 == 0, 100, 101)
    inner = slice(14, 46)
    assert (nms_single(pred)[20, inner] > 0).all()
    kept_double = nms_8bit(pred)[20, inner] > 0
    assert (kept_double == (pred[20, inner] == 101)).all()


def test_nms_single_equals_the_double_port_away_from_ties():
    rng = np.random.default_rng(3)
    u8 = (rng.random((30, 34)) * 255).astype(np.uint8)
    np.testing.assert_allclose(nms_single(u8), nms_8bit(u8), atol=2e-7)


# ---------------------------------------------------------------- SEISM: P/R rules, AP, OIS


def test_empty_thresholds_have_precision_one_in_ap():
    pred = _line((40, 40), col=20, value=128)  # the exact boundary at 128/255 = 0.502
    table = evaluate_image(pred, pred > 0, 0.011)
    assert (table[: T[0.5] + 1] == [20, 20, 20, 20]).all() and (table[T[0.51] :] == [0, 20, 0, 0]).all()
    s = scores_from_counts(table, table[0])
    # recalls {1 (P 1), 0 (nothing predicted: P 1)}: P = 1 on the whole grid → 101 / 100
    # (with P = 0 where nothing is predicted it would be Σ 0.01k / 100 = 0.505)
    assert s["ap"] == pytest.approx(1.01) and s["odsf"] == 1.0


def test_precision_recall_rules_and_first_occurrence_of_a_recall():
    # t0: R = P = 1/2; t1: predictions, none matched (P = R = 0); t2: nothing predicted (P 1, R 0)
    table = np.array([[5, 10, 5, 10], [0, 10, 0, 4], [0, 10, 0, 0]])
    s = scores_from_counts(table, table[0])
    assert s["odsf"] == pytest.approx(0.5)
    # recall 0 first occurs at t1 (P 0): the curve runs (0, 0) → (1/2, 1/2): Σ_{k=0..50} 0.01k / 100
    assert s["ap"] == pytest.approx(sum(0.01 * k for k in range(51)) / 100)
    # no ground truth: R = 1, P = 0 — unless nothing is predicted either, where the later rule
    # of gather_measure.m wins (R 0, P 1): the curve (0, 1) → (1, 0), AP = Σ (1 − 0.01k) / 100
    s = scores_from_counts(np.array([[0, 0, 0, 3], [0, 0, 0, 0]]), np.array([0, 0, 0, 3]))
    assert s["ods_recall"] == 1.0 and s["ods_precision"] == 0.0
    assert s["ap"] == pytest.approx(sum(1 - 0.01 * k for k in range(101)) / 100)
    assert average_precision(np.array([1.0, 1.0]), np.array([0.0, 1.0])) == pytest.approx(1.01)


def test_ois_picks_the_first_threshold_among_f_equal_to_six_decimals():
    # F = 0.5 at t0 and 0.5000002 at t1: both print as 0.500000 in SEISM's result files
    table = np.array([[1, 2, 1, 2], [2_500_001, 5_000_000, 2_500_001, 5_000_000]])
    assert best_image_counts(table).tolist() == [1, 2, 1, 2]
