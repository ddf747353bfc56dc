"""Binary morphology of the BSDS / SEISM boundary benchmarks: ``seg2bmap`` and ``bwmorph('thin')``.

Both are re-implemented from their published definitions because the field's evaluation
runs them in MATLAB:

* ``seg2bmap`` — D. Martin, C. Fowlkes, J. Malik, "Learning to Detect Natural Image
  Boundaries Using Local Brightness, Color, and Texture Cues", TPAMI 2004 (BSDS benchmark
  code): a pixel is a boundary pixel when its label differs from its east, south or
  south-east neighbour; on the last row only the east neighbour counts, on the last column
  only the south one, and the bottom-right pixel is never a boundary.
* ``bwmorph(·, 'thin', Inf)`` — Z. Guo, R. W. Hall, "Parallel Thinning with Two-Subiteration
  Algorithms", Comm. ACM 32(3), 1989, as MATLAB applies it: two look-up-table passes
  (conditions G1 ∧ G2 ∧ G3, then G1 ∧ G2 ∧ G3') repeated until a whole iteration changes
  nothing; pixels outside the image are 0.

``pyEdgeEval.preprocess.binary_thin`` builds the same two tables but stops as soon as the
*first* sub-iteration changes nothing, skipping a second sub-iteration that may still delete
pixels, and its ``bwmorph_thin`` uses ``np.bool`` (gone in numpy ≥ 1.24); hence this file.
"""

from __future__ import annotations

import numpy as np

# neighbours x1..x8 of Guo & Hall: east, then counter-clockwise (row, col offsets)
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables over the 256 neighbour codes (bit k-1 set ⇔ neighbour x_k is 1)."""
    codes = np.arange(256)
    x = [None] + [((codes >> k) & 1).astype(bool) for k in range(8)]  # x[1..8]
    x.append(x[1])  # x9 = x1
    g1 = sum((~x[2 * i - 1] & (x[2 * i] | x[2 * i + 1])).astype(int) for i in range(1, 5)) == 1
    n1 = sum((x[2 * k - 1] | x[2 * k]).astype(int) for k in range(1, 5))
    n2 = sum((x[2 * k] | x[2 * k + 1]).astype(int) for k in range(1, 5))
    m = np.minimum(n1, n2)
    g2 = (m >= 2) & (m <= 3)
    g3 = ~((x[2] | x[3] | ~x[8]) & x[1])
    g3p = ~((x[6] | x[7] | ~x[4]) & x[5])
    return g1 & g2 & g3, g1 & g2 & g3p


_DELETE_1, _DELETE_2 = _thin_luts()


def thin(bmap: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """MATLAB ``bwmorph(bmap, 'thin', max_iter)`` (``None`` = ``Inf``).

    Works on the foreground pixels only (boundary maps are sparse), with the parallel
    semantics of a look-up-table pass: every decision of a sub-iteration sees the image as
    it was before that sub-iteration.

    Args:
        bmap: 2-D array; non-zero is foreground.
        max_iter: maximum number of full iterations (``None``: until nothing changes).

    Returns:
        Boolean array of the same shape.
    """
    if bmap.ndim != 2:
        raise ValueError(f"thin expects a 2-D map, got shape {bmap.shape}")
    h, w = bmap.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = bmap != 0
    flat = padded.ravel()
    stride = w + 2
    offsets = [dr * stride + dc for dr, dc in _NEIGHBOURS]
    idx = np.flatnonzero(flat)
    it = 0
    while max_iter is None or it < max_iter:
        changed = False
        for lut in (_DELETE_1, _DELETE_2):
            code = np.zeros(idx.size, dtype=np.int64)
            for k, off in enumerate(offsets):
                code |= flat[idx + off].astype(np.int64) << k
            kill = lut[code]
            if kill.any():
                flat[idx[kill]] = 0
                idx = idx[~kill]
                changed = True
        it += 1
        if not changed:
            break
    return padded[1:-1, 1:-1].astype(bool)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """BSDS ``seg2bmap`` at the segmentation's own size: boundaries of a label map.

    Args:
        seg: ``H × W`` label map (any integer or float labels; a binary edge map is read as
            a two-label map, as the NYUD-v2 protocol does).

    Returns:
        Boolean ``H × W`` boundary map.
    """
    if seg.ndim != 2:
        raise ValueError(f"seg2bmap expects a 2-D label map, got shape {seg.shape}")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg != e) | (seg != s) | (seg != se)
    b[-1, :] = seg[-1, :] != e[-1, :]
    b[:, -1] = seg[:, -1] != s[:, -1]
    b[-1, -1] = False
    return b
