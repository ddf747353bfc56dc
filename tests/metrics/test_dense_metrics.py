"""Dense metrics on hand-computed cases: perfect, all wrong, a known confusion matrix, known
angles, known depth errors, known saliency thresholds."""

import math

import numpy as np
import pytest
import torch

from mtl.metrics import ConfusionMatrixMetric, DepthMetric, NormalsMetric, SaliencyMaxF


def _labels(rows):
    return torch.tensor(rows, dtype=torch.long)[None]


def test_confusion_perfect_all_wrong_and_known_matrix():
    m = ConfusionMatrixMetric(3)
    gt = _labels([[0, 1, 2, 2]])
    m.update(gt.clone(), gt)
    assert m.compute()["miou"].item() == 1.0 and m.compute()["pixel_acc"].item() == 1.0
    m = ConfusionMatrixMetric(2)
    m.update(1 - _labels([[0, 1, 0, 1]]), _labels([[0, 1, 0, 1]]))
    out = m.compute()
    assert out["miou"].item() == 0.0 and out["pixel_acc"].item() == 0.0
    # known matrix (rows gt, cols pred): [[3, 1, 0], [0, 2, 2], [1, 0, 1]] + one ignored pixel
    gt = _labels([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 255]])
    pr = _labels([[0, 0, 0, 1, 1, 1, 2, 2, 0, 2, 1]])
    m = ConfusionMatrixMetric(3)
    m.update(pr[:, :, :5], gt[:, :, :5])  # two batches pool into one matrix
    m.update(pr[:, :, 5:], gt[:, :, 5:])
    assert m.confmat.tolist() == [[3, 1, 0], [0, 2, 2], [1, 0, 1]]
    out = m.compute()
    ious = [3 / (4 + 4 - 3), 2 / (4 + 3 - 2), 1 / (2 + 3 - 1)]
    assert [out[f"iou_{c}"].item() for c in range(3)] == pytest.approx(ious)
    assert out["miou"].item() == pytest.approx(sum(ious) / 3)
    assert out["pixel_acc"].item() == pytest.approx(6 / 10)


def test_depth_all_metrics_known_values():
    m = DepthMetric()
    pred = torch.tensor([2.0, 1.0, 4.0, 5.0, 9.0]).view(1, 1, 1, 5)
    gt = torch.tensor([1.0, 1.0, 2.0, 4.0, 0.0]).view(1, 1, 1, 5)  # last: missing
    m.update(pred, gt)
    out = m.compute()
    err = np.array([1.0, 0.0, 2.0, 1.0])
    g = np.array([1.0, 1.0, 2.0, 4.0])
    p = np.array([2.0, 1.0, 4.0, 5.0])
    assert out["rmse"].item() == pytest.approx(math.sqrt((err**2).mean()))
    assert out["abs_rel"].item() == pytest.approx((err / g).mean())
    assert out["log_rmse"].item() == pytest.approx(math.sqrt(((np.log(p) - np.log(g)) ** 2).mean()))
    # ratios 2, 1, 2, 1.25: δ<1.25 → 1 of 4 (1.25 is not < 1.25), δ<1.5625 → 2, δ<1.953 → 2
    assert out["delta1"].item() == pytest.approx(0.25)
    assert out["delta2"].item() == pytest.approx(0.5)
    assert out["delta3"].item() == pytest.approx(0.5)
    perfect = DepthMetric()
    perfect.update(gt.clamp(min=0.5), gt)
    assert perfect.compute()["rmse"].item() == 0.0 and perfect.compute()["delta1"].item() == 1.0


def _normal_at(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_normals_known_angles_median_and_thresholds():
    angles = [0.0, 10.0, 20.0, 25.0, 40.0, 90.0, 180.0]
    gt = torch.tensor([[0.0, 0.0, 1.0]] * len(angles) + [[0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, -1)
    pred = torch.tensor([_normal_at(a) for a in angles] + [[1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, -1)
    pred[:, :, :, 1] *= 7.0  # unnormalised predictions are normalised
    m = NormalsMetric()
    m.update(pred[..., :4], gt[..., :4])
    m.update(pred[..., 4:], gt[..., 4:])  # last pixel: zero ground truth, ignored
    out = m.compute()
    a = np.array(angles)
    assert out["mean"].item() == pytest.approx(a.mean(), abs=1e-4)
    assert out["rmse"].item() == pytest.approx(math.sqrt((a**2).mean()), abs=1e-4)
    assert out["median"].item() == pytest.approx(np.median(a), abs=2e-3)
    assert out["within_11_25"].item() == pytest.approx(100 * 2 / 7)
    assert out["within_22_5"].item() == pytest.approx(100 * 3 / 7)
    assert out["within_30"].item() == pytest.approx(100 * 4 / 7)


def test_normals_median_matches_numpy_on_many_pixels():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    m = NormalsMetric()
    m.update(pred, gt)
    deg = NormalsMetric.angles(pred, gt).numpy()
    assert m.compute()["median"].item() == pytest.approx(np.median(deg), abs=2e-3)


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).view(1, 1, 1, -1).float()


def test_saliency_maxf_known_thresholds_and_miou():
    # probabilities 0.9, 0.7, 0.3, 0.1 on gt 1, 0, 1, 0
    logits, gt = _logit([0.9, 0.7, 0.3, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    m = SaliencyMaxF()
    m.update(logits, gt)
    out = m.compute()

    # on the probabilities (positive: p ≥ t): t ≤ 0.3: P = 2/3, R = 1; 0.3 < t ≤ 0.7: P = 1/2,
    # R = 1/2; 0.7 < t ≤ 0.9: P = 1, R = 1/2 (the field's second sigmoid: test_parity.py)
    def f(p, r):
        return 1.3 * p * r / (0.3 * p + r)

    assert out["maxf_prob"].item() == pytest.approx(max(f(2 / 3, 1.0), f(0.5, 0.5), f(1.0, 0.5)), abs=1e-6)
    # IoU at thresholds 0.2…0.9 (15): {0.9, 0.7, 0.3} vs {0.9, 0.3} = 2/3 up to 0.3 (exclusive),
    # then {0.9, 0.7} → 1/3, then {0.9} (t ≥ 0.7) → 1/2: best 2/3
    assert out["miou"].item() == pytest.approx(2 / 3, abs=1e-6)
    perfect = SaliencyMaxF()
    perfect.update(_logit([0.99, 0.01]), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2))
    assert perfect.compute()["maxf_prob"].item() == pytest.approx(1.0)
    assert perfect.compute()["miou"].item() == pytest.approx(1.0)
    wrong = SaliencyMaxF()
    wrong.update(_logit([0.01, 0.99]), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2))
    assert wrong.compute()["maxf_prob"].item() == 0.0 and wrong.compute()["miou"].item() == 0.0
