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
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from einops import rearrange

CLASSES: tuple[str, ...] = (
    "floor",
    "wall",
    "ceiling",
    "painting",
    "table",
    "sphere",
    "box",
    "cylinder",
    "figure",
)
FLOOR, WALL, CEILING, PAINTING, TABLE, SPHERE, BOX, CYLINDER, FIGURE = range(len(CLASSES))
#: Class ids of the room planes; every other class is a foreground (salient) object.
ROOM_CLASSES: tuple[int, ...] = (FLOOR, WALL, CEILING)
PARTS: tuple[str, ...] = ("head", "torso", "arms", "legs")
NUM_PARTS = len(PARTS)
HEAD, TORSO, ARMS, LEGS = range(1, NUM_PARTS + 1)

_Range = tuple[float, float]


@dataclass(frozen=True)
class SceneParams:
    """Knobs of the scene distribution (all keyword arguments of :func:`render_scene`).

    Attributes:
        fov_deg: Horizontal field of view of the pinhole camera.
        figure_prob: Probability that an image contains the articulated figure.
        num_objects: Inclusive range of the number of spheres / boxes / cylinders.
        table_prob: Probability of a table (optionally with an object on top).
        max_paintings: Maximum number of paintings hung on the walls.
        hole_fraction: Approximate fraction of pixels turned into depth-sensor hole blobs.
        grazing_deg: Depth (and normals) are missing where the view angle exceeds this.
        max_depth: Depth beyond this range (metres) is missing.
        room_width: Range of the room extent along x (metres); likewise depth / height.
        camera_height: Range of the camera height above the floor.
        max_yaw_deg: Maximum absolute camera yaw; ``pitch_deg`` is the pitch range (down < 0).
        max_roll_deg: Maximum absolute camera roll.
    """

    fov_deg: float = 65.0
    figure_prob: float = 0.6
    num_objects: tuple[int, int] = (3, 7)
    table_prob: float = 0.5
    max_paintings: int = 2
    hole_fraction: float = 0.02
    grazing_deg: float = 84.0
    max_depth: float = 10.0
    room_width: _Range = (3.5, 6.0)
    room_depth: _Range = (4.5, 8.0)
    room_height: _Range = (2.5, 3.2)
    camera_height: _Range = (1.1, 1.7)
    max_yaw_deg: float = 15.0
    pitch_deg: _Range = (-22.0, -6.0)
    max_roll_deg: float = 2.0

    def __post_init__(self) -> None:
        if not 10.0 <= self.fov_deg <= 150.0:
            raise ValueError(f"fov_deg must be in [10, 150], got {self.fov_deg}")
        for name in ("figure_prob", "table_prob", "hole_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.num_objects
        if not 0 <= lo <= hi:
            raise ValueError(f"num_objects must be (lo, hi) with 0 <= lo <= hi, got {lo, hi}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "num_objects" and isinstance(v, tuple) and not v[0] <= v[1]:
                raise ValueError(f"{f.name} must be an increasing (lo, hi) range, got {v}")


@dataclass
class _Cam:
    pos: np.ndarray  # (3,) world position
    rot: np.ndarray  # (3, 3) columns = camera x (right), y (up), z (backwards) in world
    fx: float
    cx: float
    cy: float
    h: int
    w: int


@dataclass
class _Mat:
    kind: str  # one of _KINDS
    c1: tuple[float, ...]  # RGB colours mixed by the pattern
    c2: tuple[float, ...]
    scale: float = 1.0
    phase: float = 0.0


@dataclass
class _Prim:
    kind: str  # "sphere" | "box" | "cyl"
    center: np.ndarray  # sphere/box centre; cylinder base centre (y = bottom)
    size: np.ndarray  # sphere (r,); box half extents (3,); cylinder (r, height)
    rot: np.ndarray | None  # box orientation (columns = local axes in world); None = identity
    inst: int
    cls: int
    part: int
    mat: _Mat

    def __post_init__(self) -> None:
        self.rot = np.eye(3) if self.rot is None else self.rot


def _rot(axis: int, a: float) -> np.ndarray:
    """Rotation matrix by angle ``a`` about world axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    c, s = math.cos(a), math.sin(a)
    if axis == 0:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 1:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


_KINDS = ("plain", "planks", "tiles", "wallpaper", "noise", "grain", "bands", "checker")
_KINDS += ("vstripes", "hstripes")
_F = np.float32


def _hash(x: np.ndarray) -> np.ndarray:
    v = np.sin(x * _F(12.9898) + _F(78.233)) * _F(43758.547)
    return v - np.floor(v)


def _pattern(kind: str, q: np.ndarray, s: np.ndarray, ph: np.ndarray) -> tuple[Any, Any]:
    """Procedural texture ``kind`` at local points q (3, n): mix weight of c2 and a brightness."""
    x, y, z = q
    if kind == "planks":  # wooden planks along z: per-plank tone, grain streaks and dark seams
        k = np.floor(x / s)
        grain = np.sin(z * _F(9) + _F(4) * np.sin(z * _F(1.3) + k)) > 0.6
        f = _F(0.7) + _F(0.33) * _hash(k + ph) + _F(0.15) * grain
        return 0, f * np.where(x / s - k < 0.04, _F(0.55), _F(1))
    if kind == "tiles":
        u, v = x / s, z / s
        fu, fv = np.floor(u), np.floor(v)
        return (fu + fv) % 2, np.where((u - fu < 0.05) | (v - fv < 0.05), _F(0.6), _F(1))
    if kind == "wallpaper":
        return np.sin((x + z) * (_F(6.283) / s) + ph) > 0.3, 1
    if kind == "noise":
        w = np.sin(s * (x + _F(0.6) * y) + ph) + np.sin(s * _F(1.7) * (y - _F(0.4) * z))
        return _F(0.5) + _F(0.25) * w + _F(0.3) * np.sin(s * _F(0.5) * (x - y + z) + 3 * ph), 1
    if kind == "grain":
        return _F(0.5) + _F(0.5) * np.sin(s * (x + _F(0.1) * np.sin(z * _F(7) + ph)) + y * 3), 1
    if kind in ("bands", "hstripes"):
        return np.sin(y * s + ph) > (0 if kind == "bands" else 0.4), 1
    if kind == "checker":
        return (np.floor(x / s + ph) + np.floor(y / s) + np.floor(z / s)) % 2, 1
    if kind == "vstripes":
        return np.sin(np.arctan2(z, x) * np.round(s) + ph) > 0.2, 1
    return 0, 1  # plain


@functools.lru_cache(maxsize=16)
def _camera_grid(h: int, w: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray, float]:
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


_CORNERS = np.array(list(itertools.product((0, 1), repeat=3)), bool)


def _screen_rects(cam: _Cam, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Pixel rectangles (P, 4) = (v0, v1, u0, u1) covering the projections of P AABBs."""
    pc = (np.where(_CORNERS, hi[:, None], lo[:, None]) - cam.pos) @ cam.rot  # (P, 8, 3)
    z = -pc[..., 2]
    behind = z <= 1e-3
    z = np.where(behind, 1.0, z)
    u, v = cam.fx * pc[..., 0] / z + cam.cx, -cam.fx * pc[..., 1] / z + cam.cy
    r = np.stack([v.min(1) - 1, v.max(1) + 2, u.min(1) - 1, u.max(1) + 2], 1)
    r = np.clip(r, -1, [[cam.h, cam.h, cam.w, cam.w]]).astype(int)
    r[behind.any(1)] = [0, cam.h, 0, cam.w]
    r[behind.all(1)] = 0
    r = np.maximum(r, 0)
    r[:, 1] = np.maximum(r[:, 0], r[:, 1])
    r[:, 3] = np.maximum(r[:, 2], r[:, 3])
    return r


def _pairs(rects: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (primitive, ray) candidate pairs of all pixels inside each rectangle."""
    v0, v1, u0, u1 = rects.T
    ww = np.where(v1 > v0, u1 - u0, 0)
    n = (v1 - v0) * ww
    k = np.repeat(np.arange(len(n)), n)
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # index within the rectangle
    wk = ww[k]
    row = j // wk
    return k, (v0[k] + row) * w + u0[k] + (j - row * wk)


class _Group:
    """Structure-of-arrays table of all primitives of one kind, relative to the camera."""

    def __init__(self, prims: list[_Prim], o: np.ndarray) -> None:
        self.kind = prims[0].kind
        c = np.array([p.center for p in prims]).T  # (3, P)
        size = np.array([p.size for p in prims]).T
        self.c = c.astype(np.float32)
        self.oc = (o[:, None] - c).astype(np.float32)
        if self.kind == "sphere":
            self.r = size[0].astype(np.float32)
            self.cc = (((o[:, None] - c) ** 2).sum(0) - size[0] ** 2).astype(np.float32)
            ext = size[[0, 0, 0]]
        elif self.kind == "box":
            rot = np.stack([p.rot for p in prims], 2)  # (3, 3, P) [j, i, p] = R_p[j, i]
            self.rot = rot.astype(np.float32)
            ol = (rot * (o[:, None] - c)[:, None]).sum(0)
            self.half = size.astype(np.float32)
            self.lo, self.hi = (-size - ol).astype(np.float32), (size - ol).astype(np.float32)
            ext = (np.abs(rot) * size).sum(1)
        else:
            r, hgt = size
            self.r2, self.hgt, self.r = (
                (r * r).astype(np.float32),
                hgt.astype(np.float32),
                r.astype(np.float32),
            )
            self.cc = self.oc[0] ** 2 + self.oc[2] ** 2 - self.r2
            oy = self.oc[1]
            self.capy = np.where(oy > hgt, hgt, np.where(oy < 0, 0.0, np.nan)).astype(np.float32)
            ext, c = np.stack([r, hgt / 2, r]), c + [[0], [1], [0]] * hgt / 2
        self.aabb = (c - ext).T, (c + ext).T  # (P, 3) each

    def intersect(self, k: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Nearest hit distances (inf / nan = miss) of pairs: primitive k, ray direction d."""
        oc = self.oc.take(k, 1)
        if self.kind == "sphere":
            b, dd = (d * oc).sum(0), (d * d).sum(0)
            return (-b - np.sqrt(b * b - dd * self.cc.take(k))) / dd
        if self.kind == "box":
            dl = (self.rot.reshape(9, -1).take(k, 1).reshape(3, 3, -1) * d[:, None]).sum(0)
            inv = 1 / dl
            t1, t2 = self.lo.take(k, 1) * inv, self.hi.take(k, 1) * inv
            tn, tf = np.minimum(t1, t2).max(0), np.maximum(t1, t2).min(0)
            return np.where(tn <= tf, tn, np.inf)
        dx, dy, dz = d
        a, b = dx * dx + dz * dz, dx * oc[0] + dz * oc[2]
        t = (-b - np.sqrt(b * b - a * self.cc.take(k))) / a
        y = oc[1] + t * dy
        t = np.where((y >= 0) & (y <= self.hgt.take(k)), t, np.inf)
        tc = (self.capy.take(k) - oc[1]) / dy
        xc, zc = oc[0] + tc * dx, oc[2] + tc * dz
        return np.minimum(t, np.where(xc * xc + zc * zc <= self.r2.take(k), tc, np.inf))

    def surface(self, k: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World normals and local texture coordinates at hit points p (3, n) of primitives k."""
        q = p - self.c.take(k, 1)
        if self.kind == "sphere":
            return q / np.sqrt((q * q).sum(0)), q
        if self.kind == "box":
            rk = self.rot.reshape(9, -1).take(k, 1).reshape(3, 3, -1)
            ql = (rk * q[:, None]).sum(0)
            ax, ar = np.argmax(np.abs(ql) / self.half.take(k, 1), 0), np.arange(q.shape[1])
            return rk[:, ax, ar] * np.sign(ql[ax, ar]), ql
        rad = np.sqrt(q[0] ** 2 + q[2] ** 2)
        hgt = self.hgt.take(k)
        cap = np.minimum(np.abs(q[1]), np.abs(q[1] - hgt)) < np.abs(rad - self.r.take(k))
        side = ~cap / np.maximum(rad, 1e-9)
        n = np.stack([q[0] * side, np.sign(q[1] - hgt / 2) * cap, q[2] * side])
        return n, q


class _Draw:
    """Buffered scalar uniform draws from a numpy Generator (cheaper than per-call numpy)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self._buf = rng, []

    def __call__(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self._buf:
            self._buf = self.rng.random(256).tolist()
        return lo + (hi - lo) * self._buf.pop()

    def int(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi)."""
        return min(hi - 1, lo + int((hi - lo) * self()))

    def colour(self, base: Any, amount: float = 0.12) -> tuple[float, ...]:
        return tuple(min(1.0, b * self(1 - amount, 1 + amount)) for b in base)


_CLASS_MATS: dict[int, tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...], _Range]] = {
    # class: (pattern choices, colour 1, colour 2, texture scale range)
    FLOOR: (("planks", "tiles"), (0.55, 0.37, 0.22), (0.72, 0.70, 0.64), (0.15, 0.5)),
    WALL: (("wallpaper", "plain"), (0.82, 0.80, 0.72), (0.72, 0.74, 0.78), (0.08, 0.3)),
    CEILING: (("plain",), (0.92, 0.92, 0.90), (0.88, 0.88, 0.86), (1.0, 1.0)),
    PAINTING: (("noise",), (0.85, 0.55, 0.15), (0.15, 0.35, 0.75), (3.0, 9.0)),
    TABLE: (("grain",), (0.36, 0.21, 0.10), (0.50, 0.32, 0.17), (25.0, 50.0)),
    SPHERE: (("bands",), (0.85, 0.20, 0.15), (0.95, 0.85, 0.30), (12.0, 30.0)),
    BOX: (("checker",), (0.20, 0.35, 0.80), (0.85, 0.85, 0.90), (0.08, 0.2)),
    CYLINDER: (("vstripes",), (0.20, 0.62, 0.30), (0.10, 0.25, 0.12), (4.0, 10.0)),
}


def _class_mat(draw: _Draw, cls: int) -> _Mat:
    """A random instance of the texture family of class ``cls``."""
    kinds, c1, c2, (s0, s1) = _CLASS_MATS[cls]
    kind = kinds[draw.int(0, len(kinds))]
    if kind == "tiles":  # light tiles of alternating brightness
        c1, c2 = c2, tuple(0.7 * v for v in c2)
    return _Mat(kind, draw.colour(c1), draw.colour(c2), draw(s0, s1), draw(0, 2 * math.pi))


@dataclass
class _Scene:
    cam: _Cam
    room: tuple[list[float], list[float]]  # (lo, hi) corners of the room box
    room_mats: dict[int, _Mat]
    light: list[float]
    prims: list[_Prim] = field(default_factory=list)
    shadows: list[tuple[float, float, float]] = field(default_factory=list)  # floor (x, z, r)
    groups: list = field(default_factory=list)  # filled by _cast: (_Group, first id, prims)

    def add(self, kind: str, c: Any, size: Any, rot: Any, cls: int, mat: _Mat, **kw: Any) -> None:
        """Adds a primitive (a new instance unless ``same=True``; ``part`` = human part id)."""
        inst = self.prims[-1].inst if kw.get("same") else len(self.prims) + 10
        self.prims.append(_Prim(kind, c, size, rot, inst, cls, kw.get("part", 0), mat))


def _add_figure(sc: _Scene, draw: _Draw, x: float, z: float, s: float) -> None:
    """Adds the articulated figure standing at (x, z), scale ``s``, roughly facing the camera."""
    rf = _rot(1, math.atan2(sc.cam.pos[0] - x, sc.cam.pos[2] - z) + draw(-1.2, 1.2))
    base = np.array([x, 0.0, z])
    skin = _Mat("plain", draw.colour((0.85, 0.64, 0.50)), (0, 0, 0))
    top = draw.colour((draw(0.15, 0.9), draw(0.15, 0.9), draw(0.15, 0.9)), 0.05)
    shirt = _Mat("hstripes", top, draw.colour((0.9, 0.9, 0.9)), draw(15, 30), draw(0, 6))
    pants = _Mat("plain", draw.colour((0.15, 0.18, 0.35)), (0, 0, 0))
    arms = shirt if draw() < 0.5 else skin
    parts = [("sphere", base + [0, 1.56 * s, 0], [0.12 * s], None, skin, HEAD)]
    parts.append(("box", base + [0, 1.15 * s, 0], [0.19 * s, 0.3 * s, 0.11 * s], rf, shirt, TORSO))
    for side in (-1, 1):
        shoulder = base + rf @ [side * 0.245 * s, 1.4 * s, 0]
        ra = rf @ _rot(0, draw(-1.0, 1.0)) @ _rot(2, side * draw(0.1, 1.0))
        arm = shoulder + ra @ [0, -0.3 * s, 0]
        parts.append(("box", arm, [0.05 * s, 0.3 * s, 0.05 * s], ra, arms, ARMS))
        leg = base + rf @ [side * 0.1 * s, 0, 0]
        parts.append(("cyl", leg, [0.075 * s, 0.85 * s], None, pants, LEGS))
    for i, (kind, c, size, rot, mat, part) in enumerate(parts):
        sc.add(kind, c, size, rot, FIGURE, mat, part=part, same=i > 0)
    sc.shadows.append((x, z, 0.3 * s))


def _sample_scene(draw: _Draw, prm: SceneParams, h: int, w: int) -> _Scene:
    """Samples room, camera, light and objects (objects are placed inside the view frustum)."""
    wd, dp, ht = draw(*prm.room_width), draw(*prm.room_depth), draw(*prm.room_height)
    yaw = math.radians(draw(-prm.max_yaw_deg, prm.max_yaw_deg))
    pitch, roll = math.radians(draw(*prm.pitch_deg)), math.radians(draw(-1, 1) * prm.max_roll_deg)
    pos = np.array([draw(-0.3, 0.3) * wd / 2, min(draw(*prm.camera_height), ht - 0.3), -draw(0.25, 0.7)])
    rot = _rot(1, yaw) @ _rot(0, pitch) @ _rot(2, roll)
    cam = _Cam(pos, rot, _camera_grid(h, w, prm.fov_deg)[2], (w - 1) / 2, (h - 1) / 2, h, w)
    mats = {c: _class_mat(draw, c) for c in ROOM_CLASSES}
    light = [draw(-wd / 4, wd / 4), ht - 0.15, -draw(0.3, 0.7) * dp]
    sc = _Scene(cam, ([-wd / 2, 0.0, -dp], [wd / 2, ht, 0.0]), mats, light)
    placed: list[tuple[float, float, float]] = []
    tan_half, sy, cy = math.tan(math.radians(prm.fov_deg) / 2), math.sin(yaw), math.cos(yaw)

    def place(r: float) -> tuple[float, float] | None:
        for _ in range(30):
            dist = draw(1.4, 0.9 * dp)
            lat = draw(-1, 1) * tan_half * dist
            x, z = pos[0] - dist * sy + lat * cy, pos[2] - dist * cy - lat * sy
            if abs(x) > wd / 2 - r - 0.05 or not -dp + r + 0.05 < z < pos[2] - 1.0:
                continue
            if all((x - a) ** 2 + (z - b) ** 2 > (r + c + 0.05) ** 2 for a, b, c in placed):
                placed.append((x, z, r))
                return x, z
        return None

    if draw() < prm.figure_prob:
        s = draw(0.85, 1.05)
        if (xz := place(0.4 * s)) is not None:
            _add_figure(sc, draw, *xz, s)
    if draw() < prm.table_prob:
        tw, td, th = draw(0.8, 1.5), draw(0.6, 0.9), draw(0.65, 0.8)
        if (xz := place(math.hypot(tw, td) / 2)) is not None:
            (x, z), rt, mat = xz, _rot(1, draw(-0.8, 0.8)), _class_mat(draw, TABLE)
            sc.add("box", rt @ [0, th - 0.025, 0] + [x, 0, z], [tw / 2, 0.025, td / 2], rt, TABLE, mat)
            for sx, sz in itertools.product((-1, 1), repeat=2):
                leg = rt @ [sx * (tw / 2 - 0.06), (th - 0.05) / 2, sz * (td / 2 - 0.06)] + [x, 0, z]
                sc.add("box", leg, [0.03, (th - 0.05) / 2, 0.03], rt, TABLE, mat, same=True)
            sc.shadows.append((x, z, 0.45 * math.hypot(tw, td)))
            if draw() < 0.6:  # a small ball on the table
                r, off = draw(0.07, 0.14), rt @ [draw(-0.3, 0.3) * tw, 0, draw(-0.3, 0.3) * td]
                sc.add(
                    "sphere", [x + off[0], th + r, z + off[2]], [r], None, SPHERE, _class_mat(draw, SPHERE)
                )
    for _ in range(draw.int(prm.num_objects[0], prm.num_objects[1] + 1)):
        cls = (SPHERE, BOX, CYLINDER)[draw.int(0, 3)]
        if cls == SPHERE:
            r = draw(0.15, 0.45)
            kind, size, y, foot = "sphere", [r], r, r
        elif cls == BOX:
            size = [draw(0.12, 0.45), draw(0.1, 0.55), draw(0.12, 0.45)]
            kind, y, foot = "box", size[1], math.hypot(size[0], size[2])
        else:
            kind, size, y = "cyl", [draw(0.1, 0.35), draw(0.3, 1.3)], 0.0
            foot = size[0]
        rot = _rot(1, draw(0, math.pi)) if cls == BOX and draw() < 0.6 else None
        if (xz := place(foot)) is not None:
            sc.add(kind, [xz[0], y, xz[1]], size, rot, cls, _class_mat(draw, cls))
            sc.shadows.append((*xz, foot))
    walls: list[tuple[int, float, float, float, float]] = []
    for i in range(draw.int(0, prm.max_paintings + 1)):
        pw, ph, wall = draw(0.4, 1.2), draw(0.3, 0.9), draw.int(0, 3)
        span = wd if wall == 0 else dp - 1.0
        y = draw(1.0 + ph / 2, max(1.0 + ph / 2, ht - 0.25 - ph / 2))
        a = draw(-1, 1) * (span / 2 - pw / 2 - 0.1)
        if y + ph / 2 > ht - 0.1 or any(
            wl == wall and abs(a - a2) < (pw + w2) / 2 and abs(y - y2) < (ph + h2) / 2
            for wl, a2, y2, w2, h2 in walls
        ):
            continue
        walls.append((wall, a, y, pw, ph))
        t = 0.02 + 0.005 * i
        if wall == 0:
            c, half = [a, y, -dp + t], [pw / 2, ph / 2, t]
        else:
            c, half = [(1 if wall == 1 else -1) * (wd / 2 - t), y, a - dp / 2 - 0.5], [t, ph / 2, pw / 2]
        mat = _class_mat(draw, PAINTING)
        mat.c1, mat.c2 = (tuple(draw(0.05, 0.95) for _ in range(3)) for _ in range(2))
        sc.add("box", c, half, None, PAINTING, mat)
    return sc


_ROOM_CLS = np.array([WALL, WALL, FLOOR, CEILING, WALL, WALL], np.uint8)
_ROOM_NRM = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float32)
_ROOM_NRM = np.ascontiguousarray(_ROOM_NRM.T)


def _hole_mask(draw: _Draw, prm: SceneParams, h: int, w: int) -> np.ndarray:
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


def _cast(sc: _Scene, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """Casts all rays d (3, N): distances t, room face ids and hit primitive ids (-1 = room)."""
    (lo, hi), o = sc.room, sc.cam.pos.tolist()
    tx, ty, tz = (np.maximum((lo[a] - o[a]) / d[a], (hi[a] - o[a]) / d[a]) for a in range(3))
    t = np.minimum(tx, ty)
    isz = tz < t
    isy = ~isz & (ty < tx)
    t = np.minimum(t, tz)
    px, py, pz = d > 0
    pos = (isz & pz) | (isy & py) | (~(isy | isz) & px)
    face = ((isy.view(np.int8) + 2 * isz.view(np.int8)) * 2 + pos.view(np.int8)).astype(np.intp)
    pid = np.full(t.shape, -1, np.int16)
    if not sc.prims:
        return t, face, pid
    # Objects: candidate (primitive, ray) pairs from screen-space bounding boxes, then scatter-min.
    o, start, groups = sc.cam.pos, 0, []
    for kind in ("sphere", "box", "cyl"):
        prims = [p for p in sc.prims if p.kind == kind]
        if prims:
            groups.append((_Group(prims, o), start, prims))
            start += len(prims)
    lo_hi = [np.concatenate(b) for b in zip(*(g.aabb for g, _, _ in groups), strict=True)]
    rects = _screen_rects(sc.cam, *lo_hi)
    k, ri = _pairs(rects, sc.cam.w)
    dr = d.take(ri, 1)
    bounds = np.searchsorted(k, [s for _, s, _ in groups] + [start])
    tk = np.concatenate(
        [
            g.intersect(k[a:b] - s, dr[:, a:b])
            for (g, s, _), a, b in zip(groups, bounds, bounds[1:], strict=False)
        ]
    )
    ok = tk > 0
    ri, tk, gp = ri[ok], tk[ok], k[ok]
    np.minimum.at(t, ri, tk)
    win = tk == t[ri]
    pid[ri[win]] = gp[win]
    sc.groups = groups
    return t, face, pid


def _texture(mats: list[_Mat], mat: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Albedo (3, N) of pixels with material ids ``mat`` at texture coordinates ``q``.

    Each texture kind is evaluated once on all of its pixels.
    """
    c1, c2 = (np.array([getattr(m, c) for m in mats], np.float32).T for c in ("c1", "c2"))
    sp = np.array([(m.scale, m.phase) for m in mats], np.float32).T
    mat_kind = np.array([_KINDS.index(m.kind) for m in mats], np.int8)
    kind = mat_kind.take(mat)
    order = np.argsort(kind, kind="stable")
    bounds = np.cumsum(np.bincount(kind, minlength=len(_KINDS)))
    alb = np.empty_like(q)
    for kd, a, b in zip(range(len(_KINDS)), np.r_[0, bounds[:-1]], bounds, strict=True):
        if b == a:
            continue
        idx, users = order[a:b], np.flatnonzero(mat_kind == kd)
        if len(users) == 1:  # a single material (e.g. a room plane): scalar parameters
            mm = slice(users[0], users[0] + 1)
            s_ph, col1, col2 = sp[:, mm], c1[:, mm], c2[:, mm]
        else:
            mm = mat.take(idx)
            s_ph, col1, col2 = sp.take(mm, 1), c1.take(mm, 1), c2.take(mm, 1)
        if kd == 0:  # plain
            col = np.broadcast_to(col1, (3, b - a))
        else:
            wt, f = _pattern(_KINDS[kd], q.take(idx, 1), *s_ph)
            col = (col1 + (col2 - col1) * wt) * f
        for c in range(3):
            alb[c][idx] = col[c]
    return alb


def _shade(sc: _Scene, pts: np.ndarray, nrm: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Point light with soft falloff, hemispheric ambient and soft floor contact shadows."""
    ldir = np.array(sc.light, np.float32)[:, None] - pts
    l2 = (ldir * ldir).sum(0)
    ndl = np.maximum((nrm * ldir).sum(0), 0) / np.sqrt(l2)
    shade = _F(0.32) + _F(0.08) * nrm[1] + ndl * (_F(1.1) / (1 + _F(0.03) * l2))
    if sc.shadows:  # compact support of radius 1.5 r around each footprint
        h, w = sc.cam.h, sc.cam.w
        x, z, r = np.array(sc.shadows).T * [[1], [1], [1.5]]
        lo, hi = np.stack([x - r, 0 * x, z - r], 1), np.stack([x + r, 0 * x, z + r], 1)
        cls2, shade2, pts2 = cls.reshape(h, w), shade.reshape(h, w), pts.reshape(3, h, w)
        rects = _screen_rects(sc.cam, lo, hi).tolist()
        for (v0, v1, u0, u1), sx, sz, sr in zip(rects, x.tolist(), z.tolist(), r.tolist(), strict=True):
            win = (slice(v0, v1), slice(u0, u1))
            r2 = (pts2[0][win] - sx) ** 2 + (pts2[2][win] - sz) ** 2
            fac = np.maximum(1 - r2 * (1 / sr**2), 0) ** 2
            shade2[win] *= 1 - (cls2[win] == FLOOR) * _F(0.5) * fac
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
    prm = SceneParams(**scene_params)
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise ValueError(f"height and width must be positive, got {(height, width)}")
    draw = _Draw(np.random.default_rng(np.random.SeedSequence([seed, index])))
    sc = _sample_scene(draw, prm, h, w)
    d_cam, inv_norm, fx = _camera_grid(h, w, prm.fov_deg)
    rot = sc.cam.rot.astype(np.float32)
    d = np.empty_like(d_cam)  # world ray directions (3, N); explicit sums, not BLAS (threads)
    for i in range(3):
        np.multiply(d_cam[0], rot[i, 0], out=d[i])
        d[i] += rot[i, 1] * d_cam[1]
        d[i] += rot[i, 2] * d_cam[2]
    with np.errstate(all="ignore"):
        t, face, pid = _cast(sc, d)
        pts = sc.cam.pos.astype(np.float32)[:, None] + d * t
        cls, inst = _ROOM_CLS.take(face), face.astype(np.uint16) + 1
        part = np.zeros(t.shape, np.uint8)
        nrm = _ROOM_NRM.take(face, 1)
        mats = [sc.room_mats[c] for c in ROOM_CLASSES]
        mat = cls.astype(np.int16)  # room material index = class id (FLOOR, WALL, CEILING)
        oi = np.flatnonzero(pid >= 0)
        local = []  # (pixel ids, local texture coordinates) of the object pixels
        if oi.size:
            gp = pid[oi]
            order = np.argsort(gp, kind="stable")
            oi, gp = oi[order], gp[order]
            prims = [p for _, _, ps in sc.groups for p in ps]
            tab = np.array([(p.cls, p.inst, p.part, i + 3) for i, p in enumerate(prims)]).T
            for arr, col in zip((cls, inst, part, mat), tab, strict=True):
                arr[oi] = col.astype(arr.dtype).take(gp)
            mats += [p.mat for p in prims]
            for g, start, ps in sc.groups:
                a, b = np.searchsorted(gp, [start, start + len(ps)])
                n, ql = g.surface(gp[a:b] - start, pts.take(oi[a:b], 1))
                local.append((oi[a:b], ql))
                for c in range(3):
                    nrm[c][oi[a:b]] = n[c]
        shade = _shade(sc, pts, nrm, cls)
        for idx, ql in local:  # pts becomes the texture coordinates (world for the room)
            for c in range(3):
                pts[c][idx] = ql[c]
        alb = _texture(mats, mat, pts)
        alb *= shade * 255
        alb += 0.5
        image = np.empty((t.size, 3), np.uint8)
        for c in range(3):
            image[:, c] = np.minimum(alb[c], 255)
        # Sensor model: holes (blobs, grazing view, out of range) in depth and normals.
        cos_view = np.abs((nrm * d).sum(0)) * inv_norm
        holes = (cos_view < math.cos(math.radians(prm.grazing_deg))) | (t > prm.max_depth)
        holes |= _hole_mask(draw, prm, h, w).ravel()
    keep = (~holes).astype(np.float32)
    nrm *= keep
    normals = np.empty((t.size, 3), np.float32)
    for c in range(3):  # world -> camera frame: n_cam[c] = sum_j R[j, c] n_world[j]
        normals[:, c] = rot[0, c] * nrm[0] + rot[1, c] * nrm[1] + rot[2, c] * nrm[2]
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
