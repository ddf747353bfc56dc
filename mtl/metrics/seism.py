"""Per-image boundary evaluation of the SEISM protocol, on pyEdgeEval's matcher.

J. Pont-Tuset, F. Marques, "Supervised Evaluation of Image Segmentation and Object Proposal
Techniques", TPAMI 2016 (SEISM, github.com/jponttuset/seism), as the multi-task dense-prediction
literature (ATRC, InvPT, TaskPrompter, TaskExpert) runs it for odsF on NYUD-v2 and
PASCAL-Context; matching by D. Martin et al.'s BSDS ``correspondPixels`` (TPAMI 2004);
non-maximum suppression by P. Dollár & C. L. Zitnick's ``edgesNmsMex`` (Structured Edge
Detection, TPAMI 2015).

Steps for one image, in the order of SEISM's ``src/io/read_one_cont_png.m`` and
``src/piotr_edges/edgesEvalImg.m``:

1. the prediction is the field's 8-bit PNG (``astype(np.uint8)`` of 255·p, a truncation), read
   back with ``im2single``: ``float32(value) / 255`` — **single precision**, and so is every
   following step up to the binarisation (``convTri``, ``gradient2`` and ``edgesNmsMex`` are
   single-precision MEX functions);
2. orientation: ``[Ox, Oy] = gradient2(convTri(E, 4))``, ``[Oxx, ~] = gradient2(Ox)``,
   ``[Oxy, Oyy] = gradient2(Oy)``, ``O = mod(atan(Oyy·sign(−Oxy) / (Oxx + 1e-5)), π)``;
3. ``edgesNmsMex(E, O, r=1, s=5, m=1.01)`` on the *unsmoothed* map: a pixel is suppressed when
   ``1.01·E`` is below the bilinear interpolation of ``E`` one pixel away along ``±O``, then
   the ``s`` outer rows and columns are tapered by ``x/s`` — :func:`nms_single` reproduces its
   float32 arithmetic operation by operation (the double-precision port ``pyEdgeEval.nms``
   differs: ``1.01`` becomes 1.00999999, so a 100/255 pixel between two 101/255 neighbours is
   suppressed there and kept in SEISM, and its border taper rounds differently);
4. per threshold ``t`` of :data:`THRESHOLDS`: ``E_nms > t`` (strict), the single-precision map
   compared by value with the double threshold (MATLAB compares mixed classes by value; so a
   pixel of 51/255 — float32 0.20000000298 — is above ``t = 0.2``), thinned again
   (``bwmorph('thin', Inf)``), matched to the ground truth by
   ``pyEdgeEval.correspond_pixels(pred, gt, max_dist)`` (``max_dist`` is a fraction of the
   image diagonal, declared by each dataset: :attr:`mtl.data.base.DenseDataset.EDGE_MAX_DIST`);
5. ground truth: ``thin(seg2bmap(label_map))``.

``precision="double"`` in :func:`evaluate_image` keeps the former float64 pipeline (the map
as ``value / 255`` in double and ``pyEdgeEval.nms``), for comparison only.

BSDS ``correspondPixels`` draws random outlier edges from a library-global generator that
the library seeds from the clock when it loads; when several assignments cost the same, the
matched counts depend on its state. :func:`match_counts` re-seeds it to a fixed value before
every call (through the library's exported ``Random::reseed``), so each result is a pure
function of its two maps: the same for any worker count, rank count, image order or run. The
seed itself is arbitrary, and other seeds give other, equally valid matchings, so the numbers
move with it by more than the last digit: on 6 small images (synthetic scenes, 64 × 80 to
96 × 128, noisy soft predictions) 8 seeds gave odsF values 0.08 points apart (max − min, in
percent; standard deviation 0.03), oisF 0.16 points and AP 0.02 points. MATLAB's clock-seeded
runs of the field vary the same way from run to run; the spread shrinks as the split grows.

The result of an image is a ``T × 4`` table of counts per threshold: matched ground-truth
pixels, ground-truth pixels, matched predicted pixels, predicted pixels. Thresholds whose
binary map equals the previous one (same pixel count of nested sets) reuse its counts, and
empty maps skip the matcher: the counts are identical, only faster.
"""

from __future__ import annotations

import ctypes
import importlib.util
import warnings
from typing import Literal

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
            "library's clock-seeded generator: counts vary between runs, as in BSDS (odsF by up to ~0.1 "
            "point on small images)",
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
    """Steps 1–3 in double precision (``value / 255`` in float64, ``pyEdgeEval.nms``); not SEISM's
    arithmetic (see :func:`nms_single`), kept for comparison."""
    if pred_u8.dtype != np.uint8:
        raise ValueError(f"the SEISM protocol reads 8-bit maps; got dtype {pred_u8.dtype}")
    edge = pred_u8.astype(np.float64) / 255.0
    return nms(edge, orientation(edge), 1, 5, 1.01)


def _interp_single(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``edgesNmsMex``'s bilinear ``interp`` at float32 points ``(x, y)`` (x: column), in float32."""
    h, w = img.shape
    x = np.where(x < 0, np.float32(0), np.where(x.astype(np.float64) > w - 1.001, np.float32(w - 1.001), x))
    y = np.where(y < 0, np.float32(0), np.where(y.astype(np.float64) > h - 1.001, np.float32(h - 1.001), y))
    x, y = x.astype(np.float32), y.astype(np.float32)
    x0, y0 = x.astype(np.int64), y.astype(np.int64)  # truncation (the points are ≥ 0)
    dx0, dy0 = x - x0.astype(np.float32), y - y0.astype(np.float32)
    one = np.float32(1.0)
    dx1, dy1 = one - dx0, one - dy0
    return (
        img[y0, x0] * dx1 * dy1
        + img[y0, x0 + 1] * dx0 * dy1
        + img[y0 + 1, x0] * dx1 * dy0
        + img[y0 + 1, x0 + 1] * dx0 * dy0
    )


def nms_single(pred_u8: np.ndarray, r: int = 1, s: int = 5, m: float = 1.01) -> np.ndarray:
    """Steps 1–3 as SEISM runs them: ``edgesNmsMex(im2single(png), O, r, s, m)`` in float32.

    The suppression and the border taper follow Dollár's single-precision C code operation by
    operation (each product and sum rounded to float32, ``m`` as float32, the taper factor
    ``x / float(s)``). The orientation is computed in float64 from the float32 map and rounded
    to float32; the MEX ``convTri`` / ``gradient2`` compute it in single precision in their own
    order, which is not replicated. Where ``Oxy`` is zero up to rounding, its sign — and so the
    orientation — is decided by that rounding: on a smooth random 448 × 576 map, 4 of 258 032
    pixels were kept or suppressed differently by the float64 and the float32-input orientation.

    Returns:
        The suppressed map, float32.
    """
    if pred_u8.dtype != np.uint8:
        raise ValueError(f"the SEISM protocol reads 8-bit maps; got dtype {pred_u8.dtype}")
    edge = pred_u8.astype(np.float32) / np.float32(255.0)  # im2single
    ori = orientation(edge.astype(np.float64)).astype(np.float32)
    out = edge.copy()
    ys, xs = np.nonzero(edge)
    if ys.size and min(edge.shape) >= 2:  # the interpolation needs a 2 × 2 neighbourhood
        e = edge[ys, xs] * np.float32(m)
        o = ori[ys, xs].astype(np.float64)
        cos_o, sin_o = np.cos(o).astype(np.float32), np.sin(o).astype(np.float32)
        suppressed = np.zeros(ys.size, dtype=bool)
        for d in range(-r, r + 1):
            if d:
                xq = xs.astype(np.float32) + np.float32(d) * cos_o
                yq = ys.astype(np.float32) + np.float32(d) * sin_o
                suppressed |= e < _interp_single(edge, xq, yq)
        out[ys[suppressed], xs[suppressed]] = 0
    h, w = out.shape
    s = min(s, w // 2, h // 2)
    for x in range(s):
        f = np.float32(x) / np.float32(s)
        out[:, x] *= f
        out[:, w - 1 - x] *= f
    for y in range(s):
        f = np.float32(y) / np.float32(s)
        out[y, :] *= f
        out[h - 1 - y, :] *= f
    return out


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
    precision: Literal["single", "double"] = "single",
) -> np.ndarray:
    """Counts of one image at every threshold.

    Args:
        pred_u8: ``H × W`` uint8 boundary probability (the field's PNG: ``uint8(255·p)``, truncated).
        gt: ``H × W`` boolean ground-truth boundary map (already :func:`gt_boundaries`).
        max_dist: matching tolerance as a fraction of the image diagonal.
        thresholds: increasing thresholds on ``value / 255``.
        precision: ``"single"`` (SEISM's: :func:`nms_single`, float32 map compared by value with
            the thresholds) or ``"double"`` (:func:`nms_8bit`, the former float64 pipeline).

    Returns:
        ``T × 4`` int64 table (:data:`MATCHED_GT`, :data:`GT`, :data:`MATCHED_PRED`, :data:`PRED`).
    """
    if pred_u8.shape != gt.shape:
        raise ValueError(f"prediction {pred_u8.shape} and ground truth {gt.shape} differ in size")
    if precision == "single":
        soft = nms_single(pred_u8).astype(np.float64)  # exact: the comparison is by value
    elif precision == "double":
        soft = nms_8bit(pred_u8)
    else:
        raise ValueError(f"precision must be 'single' (SEISM's) or 'double', got {precision!r}")
    gt = gt.astype(bool)
    out = np.zeros((len(thresholds), 4), dtype=np.int64)
    last_n, last = -1, None
    for i, t in enumerate(thresholds):
        above = soft > float(t)
        n = int(above.sum())
        if n != last_n:  # nested sets: same size ⇔ same map
            last = match_counts(thin(above), gt, max_dist)
            last_n = n
        out[i] = last
    return out


def evaluate_pair(pred_u8: np.ndarray, label_map: np.ndarray, max_dist: float) -> np.ndarray:
    """:func:`evaluate_image` with the ground truth given as a label map (worker entry point)."""
    return evaluate_image(pred_u8, gt_boundaries(label_map), max_dist)
