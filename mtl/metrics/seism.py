"""Per-image boundary evaluation of the SEISM protocol, on pyEdgeEval's Cython primitives.

J. Pont-Tuset, F. Marques, "Supervised Evaluation of Image Segmentation and Object Proposal
Techniques", TPAMI 2016 (SEISM), as the multi-task dense-prediction literature (ATRC, InvPT,
TaskPrompter, TaskExpert) runs it for odsF on NYUD-v2 and PASCAL-Context; matching by
D. Martin et al.'s BSDS ``correspondPixels`` (TPAMI 2004); non-maximum suppression by
P. Dollár & C. L. Zitnick's ``edgesNmsMex`` (Structured Edge Detection, TPAMI 2015).

Steps for one image (the SEISM protocol), composed here in SEISM's order:

1. the prediction is an 8-bit map read back as ``value / 255``;
2. orientation: ``[Ox, Oy] = gradient2(convTri(E, 4))``, ``[Oxx, ~] = gradient2(Ox)``,
   ``[Oxy, Oyy] = gradient2(Oy)``, ``O = mod(atan(Oyy·sign(−Oxy) / (Oxx + 1e-5)), π)``;
3. ``pyEdgeEval.nms(E, O, r=1, s=5, m=1.01)`` on the *unsmoothed* map (``fast_nms`` would
   smooth it first);
4. per threshold ``t`` of :data:`THRESHOLDS`: ``E_nms > t`` (strict), thinned again
   (``bwmorph('thin', Inf)``), matched to the ground truth by
   ``pyEdgeEval.correspond_pixels(pred, gt, max_dist)`` (``max_dist`` is a fraction of the
   image diagonal, declared by each dataset: :attr:`mtl.data.base.DenseDataset.EDGE_MAX_DIST`);
5. ground truth: ``thin(seg2bmap(label_map))``.

BSDS ``correspondPixels`` draws random outlier edges from a library-global generator that
the library seeds from the clock when it loads; when several assignments cost the same, the
matched counts depend on its state. :func:`match_counts` re-seeds it to a fixed value before
every call (through the library's exported ``Random::reseed``), so each result is a pure
function of its two maps: the same for any worker count, rank count, image order or run.

The result of an image is a ``T × 4`` table of counts per threshold: matched ground-truth
pixels, ground-truth pixels, matched predicted pixels, predicted pixels. Thresholds whose
binary map equals the previous one (same pixel count of nested sets) reuse its counts, and
empty maps skip the matcher: the counts are identical, only faster.
"""

from __future__ import annotations

import ctypes
import importlib.util
import warnings

import numpy as np
from pyEdgeEval import correspond_pixels, nms
from scipy.ndimage import correlate1d

from mtl.metrics.morphology import seg2bmap, thin

#: SEISM's 101 thresholds: 0.001, 0.01, 0.02, …, 0.99, 0.999.
THRESHOLDS = np.array([0.001] + [round(0.01 * i, 2) for i in range(1, 100)] + [0.999])

# columns of a count table
MATCHED_GT, GT, MATCHED_PRED, PRED = range(4)

#: seed of the matcher's outlier-edge generator before every call
MATCH_SEED = 1


def _matcher_reseed():
    """``Random::reseed(&Random::rand, seed)`` of the loaded correspondPixels library, or ``None``."""
    try:
        path = importlib.util.find_spec("pyEdgeEval._lib.correspond_pixels").origin
        lib = ctypes.CDLL(path)  # the already-loaded library: the same static objects
        state = ctypes.addressof(ctypes.c_char.in_dll(lib, "_ZN6Random4randE"))
        fn = lib._ZN6Random6reseedEm
    except (OSError, AttributeError, ValueError, TypeError):
        warnings.warn(
            "pyEdgeEval's correspondPixels does not export Random::reseed; boundary matches keep the "
            "library's clock-seeded generator (counts may vary in the last digit between runs, as in BSDS)",
            stacklevel=2,
        )
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_uint64], None
    return lambda seed: fn(state, seed)


_RESEED = _matcher_reseed()


def conv_tri(image: np.ndarray, r: int) -> np.ndarray:
    """Dollár's ``convTri`` for an integer radius ``r ≥ 2``: separable triangle filter
    ``[1 … r+1 … 1] / (r+1)²`` with symmetric padding."""
    if r < 2:
        raise ValueError(f"conv_tri supports integer radii >= 2 here, got {r}")
    f = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float64) / (r + 1) ** 2
    out = correlate1d(image, f, axis=0, mode="reflect")  # 'reflect' = MATLAB 'symmetric'
    return correlate1d(out, f, axis=1, mode="reflect")


def gradient2(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB ``gradient``: central differences inside, one-sided at the borders → ``(Ox, Oy)``."""
    oy, ox = np.gradient(image)
    return ox, oy


def orientation(edge: np.ndarray) -> np.ndarray:
    """Edge orientation in ``[0, π)`` from the second derivatives of the triangle-smoothed map."""
    ox, oy = gradient2(conv_tri(edge, 4))
    oxx, _ = gradient2(ox)
    oxy, oyy = gradient2(oy)
    return np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)


def nms_8bit(pred_u8: np.ndarray) -> np.ndarray:
    """Steps 1–3: 8-bit prediction → thinned-by-NMS soft boundary map (float64)."""
    if pred_u8.dtype != np.uint8:
        raise ValueError(f"the SEISM protocol reads 8-bit maps; got dtype {pred_u8.dtype}")
    edge = pred_u8.astype(np.float64) / 255.0
    return nms(edge, orientation(edge), 1, 5, 1.01)


def gt_boundaries(label_map: np.ndarray) -> np.ndarray:
    """Step 5: the ground-truth boundary map ``thin(seg2bmap(label_map))``."""
    return thin(seg2bmap(label_map))


def match_counts(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> np.ndarray:
    """Counts of one binary prediction against one boundary map by ``correspond_pixels``.

    Returns:
        ``[matched GT, GT, matched predicted, predicted]`` (int64).
    """
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 or n_gt == 0:
        return np.array([0, n_gt, 0, n_pred], dtype=np.int64)
    if _RESEED is not None:
        _RESEED(MATCH_SEED)
    m_pred, m_gt, _, _ = correspond_pixels(pred.astype(np.float64), gt.astype(np.float64), max_dist)
    return np.array([int((m_gt > 0).sum()), n_gt, int((m_pred > 0).sum()), n_pred], dtype=np.int64)


def evaluate_image(
    pred_u8: np.ndarray,
    gt: np.ndarray,
    max_dist: float,
    thresholds: np.ndarray = THRESHOLDS,
) -> np.ndarray:
    """Counts of one image at every threshold.

    Args:
        pred_u8: ``H × W`` uint8 boundary probability (``round(255·p)``).
        gt: ``H × W`` boolean ground-truth boundary map (already :func:`gt_boundaries`).
        max_dist: matching tolerance as a fraction of the image diagonal.
        thresholds: increasing thresholds on ``value / 255``.

    Returns:
        ``T × 4`` int64 table (:data:`MATCHED_GT`, :data:`GT`, :data:`MATCHED_PRED`, :data:`PRED`).
    """
    if pred_u8.shape != gt.shape:
        raise ValueError(f"prediction {pred_u8.shape} and ground truth {gt.shape} differ in size")
    soft = nms_8bit(pred_u8)
    gt = gt.astype(bool)
    out = np.zeros((len(thresholds), 4), dtype=np.int64)
    last_n, last = -1, None
    for i, t in enumerate(thresholds):
        above = soft > t
        n = int(above.sum())
        if n != last_n:  # nested sets: same size ⇔ same map
            last = match_counts(thin(above), gt, max_dist)
            last_n = n
        out[i] = last
    return out


def evaluate_pair(pred_u8: np.ndarray, label_map: np.ndarray, max_dist: float) -> np.ndarray:
    """:func:`evaluate_image` with the ground truth given as a label map (worker entry point)."""
    return evaluate_image(pred_u8, gt_boundaries(label_map), max_dist)
