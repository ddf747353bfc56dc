"""Materials and procedural textures of the synthetic-scene renderer.

A :class:`Material` mixes two RGB colours with one of the procedural patterns in ``_KINDS``
(planks, tiles, wallpaper, noise, wood grain, bands, checker, stripes); :func:`texture`
evaluates the albedo of many pixels at once, one vectorised pattern evaluation per kind;
:func:`texture_one` that of one material (a room plane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

_KINDS = ("plain", "planks", "tiles", "wallpaper", "noise", "grain", "bands", "checker")
_KINDS += ("vstripes", "hstripes")
_F = np.float32


@dataclass
class Material:
    """Texture of a surface: pattern ``kind`` mixing colours ``c1`` / ``c2``."""

    kind: str  # one of _KINDS
    c1: tuple[float, ...]  # RGB colours mixed by the pattern
    c2: tuple[float, ...]
    scale: float = 1.0
    phase: float = 0.0


def _hash(x: np.ndarray) -> np.ndarray:
    v = np.sin(x * _F(12.9898) + _F(78.233)) * _F(43758.547)
    return v - np.floor(v)


def _odd(k: np.ndarray) -> np.ndarray:
    """Parity of integer-valued floats (``k % 2 == 1``; integer bit test, much cheaper than fmod)."""
    return (k.astype(np.int64) & 1) == 1


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
        return _odd(fu + fv), np.where((u - fu < 0.05) | (v - fv < 0.05), _F(0.6), _F(1))
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
        return _odd(np.floor(x / s + ph) + np.floor(y / s) + np.floor(z / s)), 1
    if kind == "vstripes":  # round(s) stripes around the axis; diamond angle (period 4), no arctan2
        p = z / (np.abs(x) + np.abs(z))
        return np.sin(np.where(x >= 0, p, 2 - p) * (np.round(s) * _F(math.pi / 2)) + ph) > 0.2, 1
    return 0, 1  # plain


def _colour(kind: int, q: Any, sel: np.ndarray) -> np.ndarray:
    """Albedo (3, n) of pattern ``_KINDS[kind]`` at q with (8, 1 or n) parameters ``sel``."""
    s_ph, col1, col2 = sel[:2], sel[2:5], sel[5:]
    wt, f = _pattern(_KINDS[kind], q, *s_ph)
    col = col1 + (col2 - col1) * wt
    return col * f if isinstance(f, np.ndarray) else col


def _params(mats: list[Material]) -> np.ndarray:
    """(8, M) float32 table of the materials: scale, phase, c1 RGB, c2 RGB."""
    return np.array([(m.scale, m.phase, *m.c1, *m.c2) for m in mats], np.float32).T


_NO_Y = {"planks", "tiles", "wallpaper", "vstripes"}  # patterns independent of y


def texture_one(alb: np.ndarray, mat: Material, pix: np.ndarray, q: np.ndarray) -> None:
    """Writes the albedo of one material into ``alb`` (3, N) at pixels ``pix`` (coordinates q (3, N))."""
    if not pix.size:
        return
    sel = _params([mat])
    if mat.kind == "plain":
        for c in range(3):
            alb[c][pix] = sel[2 + c, 0]
        return
    qp = [None if (i == 1 and mat.kind in _NO_Y) else q[i].take(pix) for i in range(3)]
    col = _colour(_KINDS.index(mat.kind), qp, sel)
    for c in range(3):
        alb[c][pix] = col[c]


def texture(alb: np.ndarray, mats: list[Material], mat: np.ndarray, q: np.ndarray, pix: np.ndarray) -> None:
    """Writes the albedo of n pixels ``pix`` into ``alb`` (3, N): sorted material ids ``mat`` (n,)
    into ``mats``, texture coordinates ``q`` (3, n). Each texture kind is evaluated once on all of its
    pixels (with scalar parameters when only one material uses it).
    """
    tab = _params(mats)
    kinds = [_KINDS.index(m.kind) for m in mats]
    kind = np.array(kinds, np.int8).take(mat)
    order = np.argsort(kind, kind="stable")  # mat is sorted: per kind, grouped by material
    cnt = np.bincount(mat, minlength=len(mats))
    bounds = np.cumsum(np.bincount(kind, minlength=len(_KINDS))).tolist()
    for kd, a, b in zip(range(len(_KINDS)), [0, *bounds[:-1]], bounds, strict=True):
        if b == a:
            continue
        idx, px = order[a:b], pix.take(order[a:b])
        users = [i for i, k in enumerate(kinds) if k == kd]
        if len(users) == 1:
            sel = tab[:, users[0] : users[0] + 1]
            if kd == 0:
                for c in range(3):
                    alb[c][px] = sel[2 + c, 0]
                continue
        else:  # per-pixel parameters: repeat (cheaper than a 2-D take)
            sel = np.repeat(tab[:, users], cnt[users], axis=1)
        col = sel[2:5] if kd == 0 else _colour(kd, q.take(idx, 1), sel)
        for c in range(3):
            alb[c][px] = col[c]
