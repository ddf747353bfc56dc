"""The certified matcher gives CSA's counts (cntR, sumR, cntP, sumP) at every threshold."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from mtl.metrics import seism
from mtl.metrics.morphology import seg2bmap, thin
from mtl.metrics.seism import (
    certified_matches,
    evaluate_image,
    match_counts,
    match_counts_fast,
    matcher_graph,
)


def _scene(shape: tuple[int, int], seed: int, n_rect: int = 5) -> np.ndarray:
    """A label map of overlapping rectangles."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, dtype=np.int64)
    h, w = shape
    for k in range(1, n_rect + 1):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        y1, x1 = y0 + rng.integers(6, h // 2), x0 + rng.integers(6, w // 2)
        seg[y0:y1, x0:x1] = k
    return seg


def _soft(gt: np.ndarray, seed: int, clutter: float) -> np.ndarray:
    """An 8-bit soft prediction: the boundary blurred and shifted, plus smooth clutter."""
    rng = np.random.default_rng(seed)
    soft = np.clip(gaussian_filter(np.roll(gt.astype(float), 1, axis=1), 1.2) * 3.0, 0, 1)
    noise = gaussian_filter(rng.random(gt.shape), 2.0)
    noise = clutter * (noise - noise.min()) / (np.ptp(noise) + 1e-12)
    return (255 * np.clip(0.85 * soft + noise, 0, 0.999)).astype(np.uint8)


def _case(shape: tuple[int, int], seed: int, clutter: float) -> tuple[np.ndarray, np.ndarray]:
    gt = thin(seg2bmap(_scene(shape, seed)))
    return _soft(gt, seed + 1, clutter), gt


CASES = {
    "scene": lambda: _case((72, 96), 0, 0.3),
    "scene_far": lambda: _case((64, 80), 2, 0.6),
    "full_noise": lambda: (
        (np.random.default_rng(4).random((60, 70)) * 255).astype(np.uint8),
        thin(seg2bmap(_scene((60, 70), 5))),
    ),
    "empty_prediction": lambda: (np.zeros((50, 60), dtype=np.uint8), thin(seg2bmap(_scene((50, 60), 6)))),
    "empty_gt": lambda: (_case((50, 60), 7, 0.3)[0], np.zeros((50, 60), dtype=bool)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("max_dist", [0.011, 0.0075, 0.03])
def test_certified_counts_equal_csa_counts_at_every_threshold(name, max_dist):
    pred_u8, gt = CASES[name]()
    new = evaluate_image(pred_u8, gt, max_dist)
    old = evaluate_image(pred_u8, gt, max_dist, matcher="csa")
    assert new.tolist() == old.tolist()
    if max_dist == 0.011:  # the former float64 map goes through the same matcher
        double = evaluate_image(pred_u8, gt, max_dist, precision="double")
        assert (
            double.tolist()
            == evaluate_image(pred_u8, gt, max_dist, precision="double", matcher="csa").tolist()
        )


def test_cases_exercise_the_certificate():
    """The equality above is not vacuous: most maps are certified (not sent back to CSA)."""
    pred_u8, gt = CASES["scene"]()
    soft = seism.nms_single(pred_u8).astype(np.float64)
    certified = [certified_matches(thin(soft > t), gt, 0.011) for t in seism.THRESHOLDS[:60:5]]
    assert sum(k is not None for k in certified) >= len(certified) - 2
    assert any(k for k in certified)


def test_matcher_graph_rebuilds_the_csa_problem():
    gt = thin(seg2bmap(_scene((40, 50), 9)))
    pred = np.roll(gt, 2, axis=0)
    n1, n2, edges, n_real = matcher_graph(pred, gt, 0.05)
    md = 0.05 * np.hypot(40, 50)
    assert n1 <= pred.sum() and n2 <= gt.sum() and n1 > 0
    # every node has its overlay edge, outlier degrees are min(6, n − 1)
    assert (edges[n_real:, 2] == edges[:, 2].max()).sum() == n1 + n2
    assert (edges[:n_real, 2] <= np.rint(md * 100)).all()
    assert edges[:, 0].max() < n1 + n2 and edges[:, 1].max() < n1 + n2
    # the graph does not depend on pixels that cannot match: an isolated far pixel changes nothing
    far = pred.copy()
    far[0, 0] = far[0, 0] or not gt[:8, :8].any()
    n1b, n2b, edges_b, _ = matcher_graph(far, gt, 0.05)
    if not gt[:8, :8].any():
        assert (n1b, n2b) == (n1, n2) and (edges_b == edges).all()


def test_fast_counts_equal_direct_calls_and_trivial_maps():
    gt = thin(seg2bmap(_scene((48, 64), 10)))
    rng = np.random.default_rng(11)
    for keep in (0.3, 0.7, 1.0):
        pred = np.roll(gt, 1, axis=1) & (rng.random(gt.shape) < keep)
        pred |= rng.random(gt.shape) > 0.97  # scattered false positives
        assert match_counts_fast(pred, gt, 0.02).tolist() == match_counts(pred, gt, 0.02).tolist()
    empty = np.zeros_like(gt)
    assert match_counts_fast(empty, gt, 0.02).tolist() == [0, int(gt.sum()), 0, 0]
    assert match_counts_fast(gt, empty, 0.02).tolist() == [0, 0, 0, int(gt.sum())]
    far = np.zeros_like(gt)
    far[0, 0] = True
    g = np.zeros_like(gt)
    g[-1, -1] = True
    assert match_counts_fast(far, g, 0.02).tolist() == [0, 1, 0, 1]  # no matchable pixel


def test_unknown_matcher_is_refused():
    with pytest.raises(ValueError, match="matcher must be"):
        evaluate_image(np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), 0.011, matcher="lap")
