"""Materials and procedural textures of the synthetic-scene renderer.

A :class:`_Mat` mixes two RGB colours with one of the procedural patterns in ``_KINDS``
(planks, tiles, wallpaper, noise, wood grain, bands, checker, stripes); :func:`_texture`
evaluates the albedo of many pixels at once, one vectorised pattern evaluation per kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_KINDS = ("plain", "planks", "tiles", "wallpaper", "noise", "grain", "bands", "checker")
_KINDS += ("vstripes", "hstripes")
_F = np.float32


@dataclass
class _Mat:
    """Texture of a surface: pattern ``kind`` mixing colours ``c1`` / ``c2``."""

    kind: str  # one of _KINDS
    c1: tuple[float, ...]  # RGB colours mixed by the pattern
    c2: tuple[float, ...]
    scale: float = 1.0
    phase: float = 0.0


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


def _texture(mats: list[_Mat], mat: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Albedo (3, N) of pixels with material ids ``mat`` at texture coordinates ``q``.

    Each texture kind is evaluated once on all of its pixels.
    """
    # One (8, M) table (scale, phase, c1 RGB, c2 RGB): one take per kind instead of three.
    tab = np.array([(m.scale, m.phase, *m.c1, *m.c2) for m in mats], np.float32).T
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
            sel = tab[:, users[0] : users[0] + 1]
        else:
            sel = tab.take(mat.take(idx), 1)
        s_ph, col1, col2 = sel[:2], sel[2:5], sel[5:]
        if kd == 0:  # plain
            col = np.broadcast_to(col1, (3, b - a))
        else:
            wt, f = _pattern(_KINDS[kd], q.take(idx, 1), *s_ph)
            col = (col1 + (col2 - col1) * wt) * f
        for c in range(3):
            alb[c][idx] = col[c]
    return alb
