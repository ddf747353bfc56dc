"""Metrics against brute-force numpy references, pooled over batches."""

import math

import numpy as np
import pytest
import torch

from mtl.metrics import ApproxEdgeF, ConfusionMatrixMetric, DepthMetric, NormalsMetric, SaliencyMaxF


def test_miou_pools_confusion_over_batches():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (2, 8, 8)) for _ in range(3)]
    prs = [rng.integers(0, 4, (2, 8, 8)) for _ in range(3)]
    gts[0][0, :2] = 255
    m = ConfusionMatrixMetric(4)
    for g, p in zip(gts, prs, strict=True):
        m.update(torch.from_numpy(p), torch.from_numpy(g))
    g = np.concatenate([x.ravel() for x in gts])
    p = np.concatenate([x.ravel() for x in prs])
    keep = g != 255
    g, p = g[keep], p[keep]
    ious = [((g == c) & (p == c)).sum() / ((g == c) | (p == c)).sum() for c in range(4)]
    out = m.compute()
    assert out["miou"].item() == pytest.approx(np.mean(ious), abs=1e-6)
    assert out["pixel_acc"].item() == pytest.approx((g == p).mean(), abs=1e-6)
    assert out["iou_2"].item() == pytest.approx(ious[2], abs=1e-6)


def test_miou_accepts_logits_and_rejects_bad_labels():
    m = ConfusionMatrixMetric(3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 1] = 1.0
    m.update(logits, torch.ones(1, 2, 2, dtype=torch.long))
    # classes 0 and 2 occur nowhere: the mean over the present classes is 1 (the field's mIoU,
    # which counts absent classes as 0, is tested in tests/metrics/test_parity.py)
    assert m.compute()["miou_present"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        m.update(logits, torch.full((1, 2, 2), 7))


def test_depth_rmse_ignores_missing_and_pools_pixels():
    m = DepthMetric()
    m.update(torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))  # 1 valid, err 1
    m.update(torch.tensor([[[[1.0, 1.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0, 4.0]]]]))  # err 0,0,3
    assert m.compute()["rmse"].item() == pytest.approx(math.sqrt((1 + 9) / 4))


def test_normals_mean_angle_degrees():
    m = NormalsMetric()
    gt = torch.zeros(1, 3, 1, 3)
    gt[0, 2] = 1.0  # +z
    gt[0, :, 0, 2] = 0.0  # invalid pixel
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, 2, 0, 0] = 5.0  # same direction, unnormalised -> 0 deg
    pred[0, 0, 0, 1] = 1.0  # perpendicular -> 90 deg
    pred[0, 0, 0, 2] = 1.0  # ignored
    m.update(pred, gt)
    assert m.compute()["mean"].item() == pytest.approx(45.0, abs=1e-4)


def test_saliency_maxf_matches_bruteforce():
    rng = np.random.default_rng(1)
    prob = rng.random((2, 1, 16, 16))
    gt = (rng.random((2, 1, 16, 16)) > 0.6).astype(np.float32)
    gt[0, 0, 0, :4] = 255
    logits = torch.from_numpy(np.log(prob / (1 - prob)))
    m = SaliencyMaxF()
    m.update(logits[:1], torch.from_numpy(gt[:1]))
    m.update(logits[1:], torch.from_numpy(gt[1:]))
    keep = gt != 255
    best = 0.0
    for thr in np.arange(1, 20) * 0.05:
        pr = prob[keep] > thr
        g = gt[keep] > 0.5
        tp = (pr & g).sum()
        p, r = tp / max(pr.sum(), 1), tp / g.sum()
        f = 1.3 * p * r / (0.3 * p + r) if p + r > 0 else 0.0
        best = max(best, f)
    # maxF on the probability itself (the field's second sigmoid: test_parity.py)
    assert m.compute()["maxf_prob"].item() == pytest.approx(best, abs=1e-5)


def test_approx_edge_f_tolerance():
    gt = torch.zeros(1, 1, 20, 20)
    gt[..., 10, :] = 1
    shifted = torch.full((1, 1, 20, 20), -10.0)
    shifted[..., 11, :] = 10.0  # one pixel off: matched within radius 2
    m = ApproxEdgeF(radius=2)
    m.update(shifted, gt)
    assert m.compute()["f"].item() == pytest.approx(1.0)
    far = torch.full((1, 1, 20, 20), -10.0)
    far[..., 16, :] = 10.0
    m2 = ApproxEdgeF(radius=2)
    m2.update(far, gt)
    assert m2.compute()["f"].item() == pytest.approx(0.0)
