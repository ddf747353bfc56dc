"""Procedural ray-cast renderer of indoor-like 3-D scenes with exact dense ground truth.

A closed box room (floor, four walls, ceiling) is populated with spheres, boxes, vertical
cylinders, tables, wall paintings and -- in a fraction of the images -- one articulated
"figure" (a person analogue made of ``NUM_PARTS`` parts). One ray per pixel is cast from a
pinhole camera (no anti-aliasing), so every label map is exact. Intersection, texturing and
shading are vectorised numpy over pixel-grid slabs; each primitive is only intersected with the
rays inside the screen-space projection of its bounding box.

Conventions of the returned maps (see :func:`render_scene`): normals are unit vectors in the
OpenGL camera frame (x right, y up, z towards the viewer); depth is the Z-depth along the
optical axis in metres with ``0`` marking simulated sensor holes; ``meta["K"]`` is the usual
OpenCV intrinsics matrix (pixel ``(u, v)`` = (column, row) index of the pixel centre). World
frame: y up, floor at ``y = 0``, the camera looks roughly along ``-z``.

The scene sampler lives in :mod:`mtl.data.synthetic.scene`, camera / primitive geometry in
:mod:`mtl.data.synthetic.geometry` and materials / textures in :mod:`mtl.data.synthetic.texture`;
this module casts the rays, shades, and assembles the ground-truth maps.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from mtl.data.synthetic.geometry import PrimitiveTable, camera_grid, candidate_pairs, screen_rects, world_rays
from mtl.data.synthetic.scene import (
    CEILING,
    FIGURE,
    FLOOR,
    WALL,
    Draw,
    Scene,
    SceneParams,
    sample_scene,
)
from mtl.data.synthetic.texture import texture, texture_one

__all__ = ["render_scene"]

_F = np.float32

_ROOM_CLS = np.array([WALL, WALL, FLOOR, CEILING, WALL, WALL], np.uint8)
_ROOM_NRM = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float32)
_ROOM_NRM = np.ascontiguousarray(_ROOM_NRM.T)


@functools.lru_cache(maxsize=64)
def _cached_params(items: tuple) -> SceneParams:
    return SceneParams(**dict(items))


def _params(**scene_params: Any) -> SceneParams:
    """Validated :class:`SceneParams` (cached for hashable arguments)."""
    try:
        return _cached_params(tuple(sorted(scene_params.items())))
    except TypeError as e:  # unhashable values, or an unknown name: validate directly
        if "unhashable" not in str(e):
            raise
        return SceneParams(**scene_params)


def _hole_mask(draw: Draw, prm: SceneParams, h: int, w: int) -> np.ndarray:
    """Random elliptic blobs covering roughly ``hole_fraction`` of the image."""
    mask = np.zeros((h, w), bool)
    if prm.hole_fraction <= 0:
        return mask
    n = draw.int(1, 4)
    area = prm.hole_fraction * h * w * draw(0.5, 1.5) / n
    for asp, ang, fu, fv in draw.rng.random((n, 4)).tolist():
        a = math.sqrt(area * (0.4 + 2 * asp) / math.pi)
        b, c, s = area / (math.pi * a), math.cos(ang * math.pi), math.sin(ang * math.pi)
        u0, v0, m = fu * w, fv * h, max(a, b)
        v, u = slice(max(0, int(v0 - m)), int(v0 + m) + 1), slice(max(0, int(u0 - m)), int(u0 + m) + 1)
        dv = np.arange(v.start, min(h, v.stop), dtype=np.float32)[:, None] - v0
        du = np.arange(u.start, min(w, u.stop), dtype=np.float32)[None, :] - u0
        mask[v, u] |= ((c * du + s * dv) / a) ** 2 + ((c * dv - s * du) / b) ** 2 < 1
    return mask


def _cast(sc: Scene, d: np.ndarray) -> tuple[Any, ...]:
    """Casts all rays d (3, N).

    Returns distances t, room face ids, hit primitive ids (-1 = room) into the primitive table
    (:class:`PrimitiveTable`), and the floor contact shadows: (shadow, pixel) candidate pairs and a
    (3, S) float32 table of centre x, centre z and 1 / radius^2.
    """
    (lo, hi), o = sc.room, sc.cam.pos
    t3 = np.divide((np.array(lo) - o).astype(np.float32)[:, None], d)  # (3, N) per-axis exits
    np.maximum(t3, np.divide((np.array(hi) - o).astype(np.float32)[:, None], d), out=t3)
    tx, ty, tz = t3
    t = np.minimum(tx, ty)
    isz = tz < t
    isy = ~isz & (ty < tx)
    np.minimum(t, tz, out=t)
    px, py, pz = d > 0
    pos = (isz & pz) | (isy & py) | (~(isy | isz) & px)
    face = ((isy.view(np.int8) + 2 * isz.view(np.int8)) * 2 + pos.view(np.int8)).astype(np.intp)
    pid = np.full(t.shape, -1, np.int16)
    tab = PrimitiveTable(sc.prims, o, sc.shadows)
    if not sc.prims:
        return t, face, pid, tab, None
    # One screen-rectangle / candidate-pair pass for the primitives and the shadow footprints,
    # then intersections per kind and a scatter-min.
    k, ri, cnt = candidate_pairs(screen_rects(sc.cam, *tab.aabb), sc.cam.w)
    cut = np.searchsorted(k, tab.bounds).tolist()
    shadows = (k[cut[3] :] - tab.bounds[3], ri[cut[3] :], tab.shadows) if sc.shadows else None
    k, ri = k[: cut[3]], ri[: cut[3]]
    dr = d.take(ri, 1)
    tb = tab.bounds  # pairs are sorted by primitive: per-kind spans, per-primitive counts
    spans = [(i, a, b) for i, (a, b) in enumerate(zip(cut[:-1], cut[1:], strict=True)) if b > a]
    tk = np.concatenate([tab.intersect(i, cnt[tb[i] : tb[i + 1]], dr[:, a:b]) for i, a, b in spans])
    ok = np.flatnonzero((tk > 0) & (tk <= t.take(ri)))  # hits in front of the room (index lists:
    ri, tk, gp = ri.take(ok), tk.take(ok), k.take(ok)  # cheaper than boolean masks)
    np.minimum.at(t, ri, tk)
    win = np.flatnonzero(tk == t.take(ri))
    pid[ri.take(win)] = gp.take(win)
    return t, face, pid, tab, shadows


def _shade(sc: Scene, pts: np.ndarray, nrm: np.ndarray, cls: np.ndarray, shadows: Any) -> np.ndarray:
    """Point light with soft falloff, hemispheric ambient and soft floor contact shadows."""
    ldir = np.array(sc.light, np.float32)[:, None] - pts
    l2 = np.einsum("ij,ij->j", ldir, ldir)  # fused dot products: no (3, N) temporaries
    ndl = np.maximum(np.einsum("ij,ij->j", nrm, ldir), 0) / np.sqrt(l2)
    shade = _F(0.32) + _F(0.08) * nrm[1] + ndl * (_F(1.1) / (1 + _F(0.03) * l2))
    if shadows is not None and shadows[0].size:  # one pass over all (shadow, pixel) pairs
        ks, ri, (sx, sz, inv_r2) = shadows
        r2 = (pts[0].take(ri) - sx.take(ks)) ** 2 + (pts[2].take(ri) - sz.take(ks)) ** 2
        fac = np.maximum(1 - r2 * inv_r2.take(ks), 0) ** 2
        np.multiply.at(shade, ri, 1 - (cls.take(ri) == FLOOR) * _F(0.5) * fac)
    return shade


def render_scene(seed: int, index: int, *, height: int, width: int, **scene_params: Any) -> dict:
    """Renders sample ``index`` of the stream ``seed`` (deterministic in seed, index, params).

    Args:
        seed: Stream seed.
        index: Sample index within the stream.
        height: Image height in pixels.
        width: Image width in pixels.
        **scene_params: Fields of :class:`SceneParams` (unknown names raise ``TypeError``).

    Returns:
        Dict with ``image`` (H, W, 3) uint8 RGB; ``semseg`` (H, W) uint8 ids into ``CLASSES``;
        ``human_parts`` (H, W) uint8 (0 = not figure, 1..NUM_PARTS = part; all 255 when no
        figure is visible); ``saliency`` (H, W) uint8 in {0, 1} (1 on non-room objects);
        ``normals`` (H, W, 3) float32 unit camera-frame normals (x right, y up, z to viewer;
        zeros where depth is missing); ``depth`` (H, W) float32 Z-depth in metres (0 = hole);
        ``edge`` (H, W) uint8 in {0, 1} (instance id differs from the right/lower neighbour);
        ``instance`` (H, W) uint16 instance ids (room planes 1..6, objects >= 10); ``meta``
        with ``id`` = ``f"{seed}_{index:06d}"``, ``size`` = (H, W) and ``K`` (3, 3) float32.
    """
    prm = _params(**scene_params)
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise ValueError(f"height and width must be positive, got {(height, width)}")
    draw = Draw(np.random.default_rng(np.random.SeedSequence([seed, index])))
    sc = sample_scene(draw, prm, h, w)
    _, inv_norm, fx = camera_grid(h, w, prm.fov_deg)
    rot = sc.cam.rot.astype(np.float32)
    d = world_rays(h, w, prm.fov_deg, sc.cam.rot)  # (3, N); broadcast sums, not BLAS (threads)
    with np.errstate(all="ignore"):
        t, face, pid, tab, shadows = _cast(sc, d)
        pts = sc.cam.pos.astype(np.float32)[:, None] + d * t
        cls, inst = _ROOM_CLS.take(face), face.astype(np.uint16) + 1
        part = np.zeros(t.shape, np.uint8)
        nrm = _ROOM_NRM.take(face, 1)
        oi = np.flatnonzero(pid >= 0)
        if oi.size:  # object pixels, grouped by primitive: labels, normals, local coordinates
            gp = pid.take(oi)
            order = np.argsort(gp, kind="stable")
            oi, gp = oi.take(order), gp.take(order)
            lab = np.array([(p.cls, p.inst, p.part) for p in tab.prims]).T
            for arr, col in zip((cls, inst, part), lab, strict=True):
                arr[oi] = col.astype(arr.dtype).take(gp)
            onrm, oq, opts = (
                np.empty((3, oi.size), np.float32),
                np.empty((3, oi.size), np.float32),
                pts.take(oi, 1),
            )
            cut, tb = np.searchsorted(gp, tab.bounds).tolist(), tab.bounds
            cnt = np.bincount(gp, minlength=tb[3])
            for i, (a, b) in enumerate(zip(cut[:-1], cut[1:], strict=True)):
                if b > a:
                    onrm[:, a:b], oq[:, a:b] = tab.surface(i, cnt[tb[i] : tb[i + 1]], opts[:, a:b])
            for c in range(3):
                nrm[c][oi] = onrm[c]
        shade = _shade(sc, pts, nrm, cls, shadows)
        # Room planes (world texture coordinates): a plain one (walls if plain, else the ceiling)
        # as the background fill, the others on their pixels.
        alb = np.empty_like(pts)
        plain = [c for c in (WALL, CEILING, FLOOR) if sc.room_mats[c].kind == "plain"][:1]
        if plain:
            alb[...] = np.array(sc.room_mats[plain[0]].c1, np.float32)[:, None]
        for c, m in sc.room_mats.items():
            if c not in plain:
                texture_one(alb, m, np.flatnonzero(cls == c), pts)
        if oi.size:
            texture(alb, [p.mat for p in tab.prims], gp, oq, oi)
        alb *= shade * 255
        alb += 0.5
        np.minimum(alb, 255, out=alb)
        image = np.empty((t.size, 3), np.uint8)
        for c in range(3):  # column writes: much faster than a transposed copy
            image[:, c] = alb[c]
        # Sensor model: holes (blobs, grazing view, out of range) in depth and normals.
        cos_view = np.abs(np.einsum("ij,ij->j", nrm, d)) * inv_norm
        holes = (cos_view < math.cos(math.radians(prm.grazing_deg))) | (t > prm.max_depth)
        holes |= _hole_mask(draw, prm, h, w).ravel()
    keep = (~holes).astype(np.float32)
    # World -> camera frame (n_cam[c] = sum_j R[j, c] n_world[j]): a table lookup for the
    # axis-aligned room planes, explicit sums (not BLAS) for the object pixels only.
    ncam = (rot.T @ _ROOM_NRM).take(face, 1)  # (3, N)
    if oi.size:
        for c in range(3):
            ncam[c, oi] = rot[0, c] * onrm[0] + rot[1, c] * onrm[1] + rot[2, c] * onrm[2]
    normals = np.empty((t.size, 3), np.float32)
    for c in range(3):
        np.multiply(ncam[c], keep, out=normals[:, c])
    inst = inst.reshape(h, w)
    edge = np.zeros((h, w), np.uint8)
    edge[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    edge[:-1] |= inst[:-1] != inst[1:]
    cls = cls.reshape(h, w)
    k = np.array([[fx, 0, sc.cam.cx], [0, fx, sc.cam.cy], [0, 0, 1]], np.float32)
    return {
        "image": image.reshape(h, w, 3),
        "semseg": cls,
        "human_parts": part.reshape(h, w) if (cls == FIGURE).any() else np.full((h, w), 255, np.uint8),
        "saliency": (cls > CEILING).astype(np.uint8),
        "normals": normals.reshape(h, w, 3),
        "depth": (t * keep).reshape(h, w),
        "edge": edge,
        "instance": inst,
        "meta": {"id": f"{seed}_{index:06d}", "size": (h, w), "K": k},
    }
