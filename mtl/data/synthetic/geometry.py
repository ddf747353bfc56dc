"""Camera, ray and primitive geometry of the synthetic-scene ray caster.

Pinhole camera rays, screen-space bounding rectangles of world AABBs, (rectangle, pixel) candidate
pairs, and the vectorised ray / sphere, box and vertical-cylinder intersections with analytic
surface normals (:class:`PrimitiveTable`). World frame: y up, floor at ``y = 0``; the camera frame is
the OpenGL one (x right, y up, z backwards). Used by :mod:`mtl.data.synthetic.scene` and
:mod:`mtl.data.synthetic.render`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from einops import rearrange

if TYPE_CHECKING:
    from mtl.data.synthetic.scene import Primitive


@dataclass
class Camera:
    """Pinhole camera: world pose, focal length / principal point (pixels) and image size."""

    pos: np.ndarray  # (3,) world position
    rot: np.ndarray  # (3, 3) columns = camera x (right), y (up), z (backwards) in world
    fx: float
    cx: float
    cy: float
    h: int
    w: int


def rotation(axis: int, a: float) -> np.ndarray:
    """Rotation matrix by angle ``a`` about world axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    c, s = math.cos(a), math.sin(a)
    if axis == 0:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 1:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


@functools.lru_cache(maxsize=16)
def camera_grid(h: int, w: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Flat camera-frame ray directions (3, h*w) with forward component 1, 1/|d|, and fx."""
    fx = (w / 2) / math.tan(math.radians(fov_deg) / 2)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    d = np.empty((3, h, w), np.float32)
    d[0] = ((np.arange(w) - cx) / fx)[None, :]
    d[1] = (-(np.arange(h) - cy) / fx)[:, None]
    d[2] = -1.0
    d = rearrange(d, "c h w -> c (h w)")
    inv_norm = 1 / np.sqrt((d * d).sum(0))
    d.flags.writeable = inv_norm.flags.writeable = False
    return d, inv_norm, fx


def world_rays(h: int, w: int, fov_deg: float, rot: np.ndarray) -> np.ndarray:
    """World ray directions (3, h*w) ``rot @ d_cam``, from the cached separable pixel grid.

    The camera-frame direction of pixel (v, u) is ``(x_u, y_v, -1)``, so each world component
    is one broadcast sum of a row term and a column term (3 full-size ops instead of 9).
    """
    d_cam = camera_grid(h, w, fov_deg)[0].reshape(3, h, w)
    xu, yv = d_cam[0, 0], d_cam[1, :, 0]
    d = np.empty((3, h, w), np.float32)
    for i in range(3):
        r0, r1, r2 = (float(v) for v in rot[i])
        np.add((r0 * xu)[None, :], (r1 * yv - r2)[:, None], out=d[i])
    return d.reshape(3, h * w)


_CORNERS = np.array(list(itertools.product((0, 1), repeat=3)), bool)


def screen_rects(cam: Camera, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Pixel rectangles (P, 4) = (v0, u0, v1, u1) covering the projections of P AABBs."""
    m = cam.rot[:, [1, 0, 2]] * [-cam.fx, cam.fx, -1.0]  # -> (fx * -y, fx * x, -z) camera frame
    q = (np.where(_CORNERS, hi[:, None], lo[:, None]) - cam.pos) @ m  # (P, 8, 3)
    z = q[..., 2:]
    behind = z[..., 0] <= 1e-3
    uv = q[..., :2] / np.where(z > 1e-3, z, 1.0) + [cam.cy, cam.cx]  # (P, 8, 2) = (v, u)
    r = np.concatenate([uv.min(1) - 1, uv.max(1) + 2], 1)
    r = np.minimum(r, [cam.h, cam.w, cam.h, cam.w]).astype(int)
    r[behind.any(1)] = [0, 0, cam.h, cam.w]
    r[behind.all(1)] = 0
    np.maximum(r, 0, out=r)
    r[:, 2:] = np.maximum(r[:, :2], r[:, 2:])
    return r


def candidate_pairs(rects: np.ndarray, w: int) -> tuple[np.ndarray, ...]:
    """Flattened (rectangle, pixel) candidate pairs of all pixels inside each rectangle, and
    the number of pairs per rectangle.

    Built from row segments: one repeat of the segment starts instead of a per-pair division.
    """
    v0, u0, v1, u1 = rects.T
    nrow, ww = v1 - v0, u1 - u0
    seg = np.repeat(np.arange(len(rects)), nrow)  # rectangle of each row segment
    first = np.cumsum(nrow) - nrow
    row = v0.take(seg) + np.arange(len(seg)) - first.take(seg)
    n = ww.take(seg)
    start = row * w + u0.take(seg) - (np.cumsum(n) - n)
    return np.repeat(seg, n), np.arange(n.sum()) + np.repeat(start, n), nrow * ww


KINDS: tuple[str, ...] = ("sphere", "box", "cyl")


class PrimitiveTable:
    """Structure-of-arrays table of all primitives relative to the camera.

    Primitives are ordered by kind (``KINDS``; stable within a kind): ids ``bounds[i]`` to
    ``bounds[i + 1]`` are of kind ``KINDS[i]``. ``intersect`` / ``surface`` take inputs sorted by
    primitive with per-primitive counts; ``aabb`` also holds the shadow footprints (``shadows``).
    """

    def __init__(self, prims: list[Primitive], o: np.ndarray, shadows: list | None = None) -> None:
        by = [[p for p in prims if p.kind == kind] for kind in KINDS]
        self.prims = [p for ps in by for p in ps]
        ns, nb, n = len(by[0]), len(by[1]), len(self.prims)
        self.bounds = (0, ns, ns + nb, n)
        if not n:
            return
        sph, box, cyl = slice(0, ns), slice(ns, ns + nb), slice(ns + nb, None)
        tab = np.array([p.row() for p in self.prims]).T  # (15, P): centre, size, rotation
        c, size, rot9 = tab[:3], tab[3:6], tab[6:]
        oc = o[:, None] - c
        rot = rot9.reshape(3, 3, -1)  # [j, i, p] = R_p[j, i]; identity unless a box
        ext = (np.abs(rot) * size).sum(1)  # world AABB half extents (spheres: size = (r, r, r))
        # Per-kind float32 parameter rows, repeated per candidate pair (itab) / hit point (stab).
        f32 = np.float32
        cc = (oc[:, sph] ** 2).sum(0) - size[0, sph] ** 2
        self.itab = [
            np.concatenate([oc[:, sph], cc[None]]).astype(f32),
            np.empty((15, 0), f32),
            np.empty((7, 0), f32),
        ]
        self.stab = [c[:, sph].astype(f32), np.empty((15, 0), f32), np.empty((5, 0), f32)]
        if nb:  # boxes: rotation, slabs in the box frame; centre, rotation, half extents
            ol = (rot[:, :, box] * oc[:, None, box]).sum(0)
            half = size[:, box]
            self.itab[1] = np.concatenate([rot9[:, box], -half - ol, half - ol]).astype(f32)
            self.stab[1] = np.concatenate([c[:, box], rot9[:, box], half]).astype(f32)
        if n > ns + nb:  # vertical cylinders (base centre c, radius r, height hgt)
            r, hgt = size[0, cyl], size[1, cyl]
            ocy, r2 = oc[:, cyl].astype(f32), (r * r).astype(f32)
            oy = ocy[1]
            capy = np.where(oy > hgt, hgt, np.where(oy < 0, 0.0, np.nan))
            self.itab[2] = np.concatenate([ocy, [ocy[0] ** 2 + ocy[2] ** 2 - r2, hgt, capy, r2]]).astype(f32)
            self.stab[2] = np.concatenate([c[:, cyl], [hgt, r]]).astype(f32)
            ext[1, cyl] = hgt / 2
            c = c.copy()
            c[1, cyl] += ext[1, cyl]
        lo, hi = (c - ext).T, (c + ext).T
        if shadows:  # floor footprints (x, z, r) of the contact shadows, support radius 1.5 r
            sh = [(x, z, 1.5 * r) for x, z, r in shadows]
            self.shadows = np.array([(x, z, 1 / (r * r)) for x, z, r in sh], np.float32).T
            lo = np.concatenate([lo, [(x - r, 0.0, z - r) for x, z, r in sh]])
            hi = np.concatenate([hi, [(x + r, 0.0, z + r) for x, z, r in sh]])
        self.aabb = lo, hi  # (P [+ S], 3) each

    def intersect(self, kind: int, cnt: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Nearest hit distances (inf / nan = miss) of pairs sorted by primitive of ``KINDS[kind]``
        (``cnt`` pairs per primitive), ray directions d (3, n)."""
        g = np.repeat(self.itab[kind], cnt, axis=1)  # per-pair parameters (cheaper than take)
        if kind == 0:
            oc = g[:3]
            b, dd = (d * oc).sum(0), (d * d).sum(0)
            return (-b - np.sqrt(b * b - dd * g[3])) / dd
        if kind == 1:
            inv = 1 / (g[0:3] * d[0] + g[3:6] * d[1] + g[6:9] * d[2])  # direction in the box frame
            t1, t2 = g[9:12] * inv, g[12:15] * inv
            tn, tf = np.minimum(t1, t2).max(0), np.maximum(t1, t2).min(0)
            return np.where(tn <= tf, tn, np.inf)
        oc, (dx, dy, dz) = g[:3], d
        a, b = dx * dx + dz * dz, dx * oc[0] + dz * oc[2]
        t = (-b - np.sqrt(b * b - a * g[3])) / a
        y = oc[1] + t * dy
        t = np.where((y >= 0) & (y <= g[4]), t, np.inf)
        tc = (g[5] - oc[1]) / dy
        xc, zc = oc[0] + tc * dx, oc[2] + tc * dz
        return np.minimum(t, np.where(xc * xc + zc * zc <= g[6], tc, np.inf))

    def surface(self, kind: int, cnt: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World normals and local texture coordinates at hit points p (3, n), sorted by
        primitive of ``KINDS[kind]`` (``cnt`` points per primitive)."""
        g = np.repeat(self.stab[kind], cnt, axis=1)
        q = p - g[:3]
        if kind == 0:
            return q / np.sqrt((q * q).sum(0)), q
        if kind == 1:
            rk = g[3:12]
            ql = rk[0:3] * q[0] + rk[3:6] * q[1] + rk[6:9] * q[2]
            a0, a1, a2 = np.abs(ql) / g[12:15]  # the face: first axis of the largest ratio
            m0 = (a0 >= a1) & (a0 >= a2)
            m2 = ~m0 & (a2 > a1)
            s = np.sign(ql)
            n = np.where(m0, rk[0::3] * s[0], np.where(m2, rk[2::3] * s[2], rk[1::3] * s[1]))
            return n, ql
        rad = np.sqrt(q[0] ** 2 + q[2] ** 2)
        hgt = g[3]
        cap = np.minimum(np.abs(q[1]), np.abs(q[1] - hgt)) < np.abs(rad - g[4])
        side = ~cap / np.maximum(rad, 1e-9)
        n = np.stack([q[0] * side, np.sign(q[1] - hgt / 2) * cap, q[2] * side])
        return n, q
