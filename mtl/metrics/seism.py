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

Certified matcher (the default, :func:`match_counts_fast`): the count CSA returns is the number
of pixel pairs in *an* optimum of the assignment problem that ``correspond_pixels`` builds
(pixel pairs within ``maxDist``, the library's ``kOfN``-sampled outlier edges after the re-seed,
the high-cost overlay; :func:`matcher_graph` rebuilds it edge for edge). Whenever every optimum
holds the same number of pairs, that number is CSA's, whichever optimum it picks.
:func:`certified_matches` solves the problem twice exactly with LAPJVsp, the pixel pairs
tie-broken towards the most and then the fewest pairs; equal results prove the count and
replace the CSA call, different ones (a tie between counts) fall back to CSA. This relies on
CSA returning an optimum (it does, for integer costs, at its final ε < 1 / (n + 1)); the tests
compare every threshold's counts with CSA's on synthetic images. Roughly half the CPU time.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import warnings
from typing import Literal

import numpy as np
import scipy.sparse as sparse
from pyEdgeEval import correspond_pixels, nms
from scipy.ndimage import correlate1d
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

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


def _matcher_kofn():
    """The loaded correspondPixels library's ``kOfN(k, n, int*)`` (its outlier-edge sampler), or ``None``."""
    try:
        lib = ctypes.CDLL(importlib.util.find_spec("pyEdgeEval._lib.correspond_pixels").origin)
        fn = lib._Z4kOfNiiPi
    except (OSError, AttributeError, ValueError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p], None
    return fn


_KOFN = _matcher_kofn()

#: matcher constants of BSDS ``match.cc``: integer cost multiplier, outlier degree, outlier cost factor
_MULTIPLIER, _DEGREE, _OUTLIER_COST = 100, 6, 100.0


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


def _draws(k: int, n: int, count: int) -> np.ndarray:
    """``count`` successive ``kOfN(k, n)`` draws of the library's generator, ``count × k`` int32."""
    out = np.zeros((count, k), dtype=np.int32)
    if k > 0:
        base, step = out.ctypes.data, out.strides[0]
        for row in range(count):
            _KOFN(k, n, base + row * step)
    return out


def matcher_graph(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[int, int, np.ndarray, int]:
    """The assignment problem ``correspond_pixels`` hands to CSA, rebuilt edge for edge.

    Nodes are the *matchable* pixels (within the tolerance of a pixel of the other map), numbered
    in column-major order; left: predicted pixels ``[0, n1)`` then outliers of the ground truth
    ``[n1, n1 + n2)``, right: ground-truth pixels ``[0, n2)`` then outliers of the prediction. Edges:
    pixel pairs within ``maxDist`` (cost ``rint(100·distance)``), ``kOfN``-sampled outlier edges
    (cost ``ow = ceil(100·outlierCost)``) drawn by the library's own generator in its order after
    the re-seed, and the perfect-match overlay (cost ``100·ow``).

    Returns:
        ``(n1, n2, edges, n_real)``: ``edges`` is ``E × 3`` int64 (left, right, cost), the first
        ``n_real`` rows the pixel pairs.
    """
    rows, cols = pred.shape
    idiag = math.sqrt(rows * rows + cols * cols)
    md = max_dist * idiag  # the tolerance in pixels, as correspond_pixels computes it
    ow = math.ceil(_OUTLIER_COST * max_dist * idiag * _MULTIPLIER)
    p, g = np.flatnonzero(pred.T), np.flatnonzero(gt.T)  # column-major: index = x·rows + y
    if p.size == 0 or g.size == 0:
        return 0, 0, np.zeros((0, 3), dtype=np.int64), 0
    px, py = np.divmod(p, rows)
    gx, gy = np.divmod(g, rows)
    pairs = cKDTree(np.c_[px, py]).sparse_distance_matrix(
        cKDTree(np.c_[gx, gy]), md + 0.5, output_type="ndarray"
    )
    ii, jj = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    d2 = ((px[ii] - gx[jj]) ** 2 + (py[ii] - gy[jj]) ** 2).astype(np.float64)
    keep = ~(d2 > md * md)  # the C test, in double
    ii, jj, d2 = ii[keep], jj[keep], d2[keep]
    m1, m2 = np.zeros(p.size, dtype=bool), np.zeros(g.size, dtype=bool)
    m1[ii], m2[jj] = True, True
    n1, n2 = int(m1.sum()), int(m2.sum())
    if n1 == 0:
        return 0, 0, np.zeros((0, 3), dtype=np.int64), 0
    ei, ej = (np.cumsum(m1) - 1)[ii], (np.cumsum(m2) - 1)[jj]
    w = np.rint(np.sqrt(d2) * _MULTIPLIER).astype(np.int64)
    d1, d2_, nmin, nmax = max(0, min(_DEGREE, n1 - 1)), max(0, min(_DEGREE, n2 - 1)), min(n1, n2), max(n1, n2)
    d3 = min(_DEGREE, nmin)
    _RESEED(MATCH_SEED)
    i1 = np.repeat(np.arange(n1), d1)
    j1 = _draws(d1, n1 - 1, n1).ravel().astype(np.int64)
    j1 += j1 >= i1  # the diagonal is skipped
    j2 = np.repeat(np.arange(n2), d2_)
    i2 = _draws(d2_, n2 - 1, n2).ravel().astype(np.int64)
    i2 += i2 >= j2
    a, b = np.repeat(np.arange(nmax), d3), _draws(d3, nmin, nmax).ravel().astype(np.int64)
    l3, r3 = (n1 + a, n2 + b) if n1 < n2 else (n1 + b, n2 + a)
    n_out = i1.size + j2.size + a.size
    left = np.concatenate([ei, i1, n1 + i2, l3, np.arange(n1), n1 + np.arange(n2)])
    right = np.concatenate([ej, n2 + j1, j2, r3, n2 + np.arange(n1), np.arange(n2)])
    cost = np.concatenate([w, np.full(n_out, ow), np.full(n1 + n2, ow * _MULTIPLIER)])
    return n1, n2, np.stack([left, right, cost], axis=1), int(w.size)


def certified_matches(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int | None:
    """The number of matched pairs CSA returns, certified by two exact solves, or ``None``.

    The count depends only on *which* optimum of the assignment problem CSA picks; it is the
    same for all of them when the optima that use the most and the fewest pixel pairs use the
    same number. Both are found by LAPJVsp (``scipy``'s ``min_weight_full_bipartite_matching``)
    on the problem of :func:`matcher_graph` with the costs scaled by ``Q = n + 1`` and the pixel
    pairs made 1 cheaper, then 1 dearer: a tie-break smaller than any cost difference, exact in
    float64 (checked). ``None`` when the two differ (a tie between counts) or the sums would leave
    float64's exact integers: the caller then runs CSA itself.
    """
    if _RESEED is None or _KOFN is None:
        return None
    n1, n2, edges, n_real = matcher_graph(pred, gt, max_dist)
    if n1 == 0:
        return 0
    n = n1 + n2
    q = n + 1
    if (int(edges[:, 2].max()) * q + 3) * n >= 2**53:
        return None
    found = []
    for sign in (-1, 1):
        val = edges[:, 2] * q + 2
        val[:n_real] += sign
        graph = sparse.csr_matrix((val.astype(np.float64), (edges[:, 0], edges[:, 1])), shape=(n, n))
        r, c = min_weight_full_bipartite_matching(graph)
        found.append(int(((r < n1) & (c < n2)).sum()))
    return found[0] if found[0] == found[1] else None


def match_counts_fast(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> np.ndarray:
    """:func:`match_counts` by :func:`certified_matches`, with CSA where the certificate fails."""
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 or n_gt == 0:
        return np.array([0, n_gt, 0, n_pred], dtype=np.int64)
    k = certified_matches(pred, gt, max_dist)
    if k is None:
        return match_counts(pred, gt, max_dist)
    return np.array([k, n_gt, k, n_pred], dtype=np.int64)


def evaluate_image(
    pred_u8: np.ndarray,
    gt: np.ndarray,
    max_dist: float,
    thresholds: np.ndarray = THRESHOLDS,
    precision: Literal["single", "double"] = "single",
    matcher: Literal["certified", "csa"] = "certified",
) -> np.ndarray:
    """Counts of one image at every threshold.

    Args:
        pred_u8: ``H × W`` uint8 boundary probability (the field's PNG: ``uint8(255·p)``, truncated).
        gt: ``H × W`` boolean ground-truth boundary map (already :func:`gt_boundaries`).
        max_dist: matching tolerance as a fraction of the image diagonal.
        thresholds: increasing thresholds on ``value / 255``.
        precision: ``"single"`` (SEISM's: :func:`nms_single`, float32 map compared by value with
            the thresholds) or ``"double"`` (:func:`nms_8bit`, the former float64 pipeline).
        matcher: ``"certified"`` (:func:`match_counts_fast`: the same counts, ~2–3× less CPU) or
            ``"csa"`` (:func:`match_counts`: ``correspond_pixels`` at every distinct threshold).

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
    if matcher not in ("certified", "csa"):
        raise ValueError(f"matcher must be 'certified' or 'csa', got {matcher!r}")
    count = match_counts_fast if matcher == "certified" else match_counts
    gt = gt.astype(bool)
    out = np.zeros((len(thresholds), 4), dtype=np.int64)
    last_n, last = -1, None
    for i, t in enumerate(thresholds):
        above = soft > float(t)
        n = int(above.sum())
        if n != last_n:  # nested sets: same size ⇔ same map
            last = count(thin(above), gt, max_dist)
            last_n = n
        out[i] = last
    return out


def evaluate_pair(
    pred_u8: np.ndarray,
    label_map: np.ndarray,
    max_dist: float,
    matcher: Literal["certified", "csa"] = "certified",
) -> np.ndarray:
    """:func:`evaluate_image` with the ground truth given as a label map (worker entry point)."""
    return evaluate_image(pred_u8, gt_boundaries(label_map), max_dist, matcher=matcher)
