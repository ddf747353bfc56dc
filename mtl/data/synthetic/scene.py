"""Random indoor-scene sampling of the synthetic-scene renderer.

Class and human-part vocabularies, the scene distribution knobs (:class:`SceneParams`) and
the sampler of one scene (:func:`sample_scene`): a closed box room with a tilted camera and a
point light, furnished with spheres, boxes, vertical cylinders, a table, wall paintings and
optionally the articulated "figure", all placed inside the view frustum. Geometry lives in
:mod:`mtl.data.synthetic.geometry`, textures in :mod:`mtl.data.synthetic.texture`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from mtl.data.synthetic.geometry import Camera, camera_grid, rotation
from mtl.data.synthetic.texture import Material

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
_EYE = np.eye(3)
_EYE.flags.writeable = False  # shared identity orientation of unrotated primitives
_EYE9 = _EYE.ravel().tolist()


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
class Primitive:
    """One primitive of the scene with its instance, class, human-part ids and material."""

    kind: str  # "sphere" | "box" | "cyl"
    center: np.ndarray  # sphere/box centre; cylinder base centre (y = bottom)
    size: np.ndarray  # sphere (r,); box half extents (3,); cylinder (r, height)
    rot: np.ndarray | None  # box orientation (columns = local axes in world); None = identity
    inst: int
    cls: int
    part: int
    mat: Material

    def __post_init__(self) -> None:
        self.rot = _EYE if self.rot is None else self.rot

    def row(self) -> list[float]:
        """Centre (3), size padded to 3 with the radius (spheres (r, r, r), cylinders (r, h, r))
        and the row-major rotation (9)."""
        c, size = self.center, self.size
        c = c.tolist() if type(c) is np.ndarray else c
        size = size.tolist() if type(size) is np.ndarray else size
        if len(size) < 3:
            size = [*size, *size[:1] * (3 - len(size))]
        return [*c, *size, *(_EYE9 if self.rot is _EYE else self.rot.ravel().tolist())]


class Draw:
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
        """``base`` RGB scaled by independent factors in [1 - amount, 1 + amount], capped at 1."""
        lo, hi = 1 - amount, 1 + amount
        r, g, b = base
        x, y, z = r * self(lo, hi), g * self(lo, hi), b * self(lo, hi)
        return (x if x < 1.0 else 1.0, y if y < 1.0 else 1.0, z if z < 1.0 else 1.0)


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


def _class_mat(draw: Draw, cls: int) -> Material:
    """A random instance of the texture family of class ``cls``."""
    kinds, c1, c2, (s0, s1) = _CLASS_MATS[cls]
    kind = kinds[draw.int(0, len(kinds))]
    if kind == "tiles":  # light tiles of alternating brightness
        c1, c2 = c2, tuple(0.7 * v for v in c2)
    return Material(kind, draw.colour(c1), draw.colour(c2), draw(s0, s1), draw(0, 2 * math.pi))


@dataclass
class Scene:
    """A sampled scene: camera, room box and materials, light, primitives and floor shadows."""

    cam: Camera
    room: tuple[list[float], list[float]]  # (lo, hi) corners of the room box
    room_mats: dict[int, Material]
    light: list[float]
    prims: list[Primitive] = field(default_factory=list)
    shadows: list[tuple[float, float, float]] = field(default_factory=list)  # floor (x, z, r)

    def add(self, kind: str, c: Any, size: Any, rot: Any, cls: int, mat: Material, **kw: Any) -> None:
        """Adds a primitive (a new instance unless ``same=True``; ``part`` = human part id)."""
        inst = self.prims[-1].inst if kw.get("same") else len(self.prims) + 10
        self.prims.append(Primitive(kind, c, size, rot, inst, cls, kw.get("part", 0), mat))


def _add_figure(sc: Scene, draw: Draw, x: float, z: float, s: float) -> None:
    """Adds the articulated figure standing at (x, z), scale ``s``, roughly facing the camera."""
    rf = rotation(1, math.atan2(sc.cam.pos[0] - x, sc.cam.pos[2] - z) + draw(-1.2, 1.2))
    base = np.array([x, 0.0, z])
    skin = Material("plain", draw.colour((0.85, 0.64, 0.50)), (0, 0, 0))
    top = draw.colour((draw(0.15, 0.9), draw(0.15, 0.9), draw(0.15, 0.9)), 0.05)
    shirt = Material("hstripes", top, draw.colour((0.9, 0.9, 0.9)), draw(15, 30), draw(0, 6))
    pants = Material("plain", draw.colour((0.15, 0.18, 0.35)), (0, 0, 0))
    arms = shirt if draw() < 0.5 else skin
    parts = [("sphere", base + [0, 1.56 * s, 0], [0.12 * s], None, skin, HEAD)]
    parts.append(("box", base + [0, 1.15 * s, 0], [0.19 * s, 0.3 * s, 0.11 * s], rf, shirt, TORSO))
    for side in (-1, 1):
        shoulder = base + rf @ [side * 0.245 * s, 1.4 * s, 0]
        ra = rf @ rotation(0, draw(-1.0, 1.0)) @ rotation(2, side * draw(0.1, 1.0))
        arm = shoulder + ra @ [0, -0.3 * s, 0]
        parts.append(("box", arm, [0.05 * s, 0.3 * s, 0.05 * s], ra, arms, ARMS))
        leg = base + rf @ [side * 0.1 * s, 0, 0]
        parts.append(("cyl", leg, [0.075 * s, 0.85 * s], None, pants, LEGS))
    for i, (kind, c, size, rot, mat, part) in enumerate(parts):
        sc.add(kind, c, size, rot, FIGURE, mat, part=part, same=i > 0)
    sc.shadows.append((x, z, 0.3 * s))


def sample_scene(draw: Draw, prm: SceneParams, h: int, w: int) -> Scene:
    """Samples room, camera, light and objects (objects are placed inside the view frustum)."""
    wd, dp, ht = draw(*prm.room_width), draw(*prm.room_depth), draw(*prm.room_height)
    yaw = math.radians(draw(-prm.max_yaw_deg, prm.max_yaw_deg))
    pitch, roll = math.radians(draw(*prm.pitch_deg)), math.radians(draw(-1, 1) * prm.max_roll_deg)
    pos = np.array([draw(-0.3, 0.3) * wd / 2, min(draw(*prm.camera_height), ht - 0.3), -draw(0.25, 0.7)])
    rot = rotation(1, yaw) @ rotation(0, pitch) @ rotation(2, roll)
    cam = Camera(pos, rot, camera_grid(h, w, prm.fov_deg)[2], (w - 1) / 2, (h - 1) / 2, h, w)
    mats = {c: _class_mat(draw, c) for c in ROOM_CLASSES}
    light = [draw(-wd / 4, wd / 4), ht - 0.15, -draw(0.3, 0.7) * dp]
    sc = Scene(cam, ([-wd / 2, 0.0, -dp], [wd / 2, ht, 0.0]), mats, light)
    placed: list[tuple[float, float, float]] = []
    tan_half, sy, cy = math.tan(math.radians(prm.fov_deg) / 2), math.sin(yaw), math.cos(yaw)
    px, pz = float(pos[0]), float(pos[2])

    def place(r: float) -> tuple[float, float] | None:
        xmax, zmin, zmax = wd / 2 - r - 0.05, -dp + r + 0.05, pz - 1.0
        for _ in range(30):
            dist = draw(1.4, 0.9 * dp)
            lat = draw(-1, 1) * tan_half * dist
            x, z = px - dist * sy + lat * cy, pz - dist * cy - lat * sy
            if abs(x) > xmax or not zmin < z < zmax:
                continue
            for a, b, c in placed:
                if (x - a) ** 2 + (z - b) ** 2 <= (r + c + 0.05) ** 2:
                    break
            else:
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
            (x, z), rt, mat = xz, rotation(1, draw(-0.8, 0.8)), _class_mat(draw, TABLE)
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
        rot = rotation(1, draw(0, math.pi)) if cls == BOX and draw() < 0.6 else None
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
