"""Labels, legends and colour bars for the pictures, drawn with PIL's default font.

Every function returns an ``H × W × 3`` uint8 array on a white background, so that the pictures
(:mod:`mtl.visualise`'s prediction panels, :func:`mtl.decoders.moe.gate_figure`) are assembled
with :func:`hstack` / :func:`vstack` and reach the loggers and PNG files in one format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
INK = (0, 0, 0)
#: the outline of a legend swatch (so that a white or black swatch stays visible)
OUTLINE = (128, 128, 128)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@lru_cache(maxsize=16)
def font(size: int) -> Font:
    """PIL's default font at ``size`` pixels (Pillow ≥ 10.1 with FreeType; older: the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def font_size(height: int) -> int:
    """A legible text size for pictures ``height`` pixels high: 12 (small maps) to 24 pixels."""
    return int(min(24, max(12, round(height / 12))))


def line_height(size: int) -> int:
    """Height of one line of text at ``size``, with a little spacing."""
    ascent, descent = font(size).getmetrics()
    return ascent + descent + 2


def text_width(text: str, size: int) -> int:
    """Width in pixels of ``text`` at ``size``."""
    return int(np.ceil(font(size).getlength(text)))


def wrap(text: str, size: int, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def blank(height: int, width: int) -> np.ndarray:
    """A white ``height × width × 3`` uint8 picture."""
    return np.full((max(height, 0), max(width, 0), 3), 255, dtype=np.uint8)


def text_block(
    lines: Sequence[str],
    size: int,
    *,
    width: int | None = None,
    height: int | None = None,
    align: str = "left",
    valign: str = "top",
    pad: int = 2,
) -> np.ndarray:
    """Lines of black text on white; the block fits the text unless ``width`` / ``height`` are given.

    Args:
        lines: the lines, top to bottom.
        size: text size in pixels (:func:`font_size`).
        width: block width (default: the widest line plus padding).
        height: block height (default: the lines plus padding).
        align: ``"left"`` or ``"center"`` within the width.
        valign: ``"top"`` or ``"middle"`` within the height.
        pad: margin in pixels.
    """
    lh = line_height(size)
    w = width if width is not None else max((text_width(t, size) for t in lines), default=0) + 2 * pad
    h = height if height is not None else lh * len(lines) + 2 * pad
    canvas = Image.new("RGB", (max(w, 1), max(h, 1)), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = pad if valign == "top" else max(pad, (h - lh * len(lines)) // 2)
    for line in lines:
        x = pad if align == "left" else max(pad, (w - text_width(line, size)) // 2)
        draw.text((x, y), line, fill=INK, font=font(size))
        y += lh
    return np.asarray(canvas, dtype=np.uint8).copy()


def _pad_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    out = blank(height, width)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def _stack(parts: Sequence[np.ndarray], gap: int, axis: int) -> np.ndarray:
    """``parts`` along ``axis`` (1: side by side, 0: one above the other), white ``gap`` between,
    each padded white to the largest extent across."""
    size = max(p.shape[1 - axis] for p in parts)
    out: list[np.ndarray] = []
    for i, p in enumerate(parts):
        if i and gap:
            out.append(blank(size, gap) if axis == 1 else blank(gap, size))
        out.append(_pad_to(p, size, p.shape[1]) if axis == 1 else _pad_to(p, p.shape[0], size))
    return np.concatenate(out, axis=axis)


def hstack(parts: Sequence[np.ndarray], gap: int = 0) -> np.ndarray:
    """Pictures side by side, top-aligned, white ``gap`` columns between, padded white to one height."""
    return _stack(parts, gap, axis=1)


def vstack(parts: Sequence[np.ndarray], gap: int = 0) -> np.ndarray:
    """Pictures one above the other, left-aligned, white ``gap`` rows between, padded white to one width."""
    return _stack(parts, gap, axis=0)


def grey(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → ``… × 3`` uint8 greys, black 0 → white 1 (a colour map for :func:`colour_bar`)."""
    v = (np.clip(values, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


def swatch(rgb: Sequence[int], side: int) -> np.ndarray:
    """A ``side × side`` square of colour ``rgb`` with a grey outline."""
    sq = np.empty((side, side, 3), dtype=np.uint8)
    sq[:] = OUTLINE
    sq[1:-1, 1:-1] = np.asarray(rgb, dtype=np.uint8)
    return sq


def swatch_legend(
    items: Sequence[tuple[Sequence[int], str]], size: int, *, height: int | None = None
) -> np.ndarray:
    """``colour  text`` lines, one per item, in as many columns as ``height`` needs (default: one column)."""
    lh = line_height(size)
    side = max(6, lh - 4)
    rows = [
        hstack([vstack([blank(2, side), swatch(rgb, side)]), text_block([text], size, height=lh)], gap=3)
        for rgb, text in items
    ]
    if not rows:
        return blank(0, 0)
    per_column = len(rows) if height is None else max(1, height // lh)
    columns = [vstack(rows[i : i + per_column]) for i in range(0, len(rows), per_column)]
    return hstack(columns, gap=2 * size)


def colour_bar(
    colours: Callable[[np.ndarray], np.ndarray],
    *,
    length: int,
    thickness: int,
    vertical: bool = True,
) -> np.ndarray:
    """A gradient of ``colours`` (values in [0, 1] → ``… × 3`` uint8) with a grey outline.

    Vertical bars run from 1 at the top to 0 at the bottom; horizontal ones from 0 (left) to 1.
    """
    t = np.linspace(1.0, 0.0, length) if vertical else np.linspace(0.0, 1.0, length)
    strip = colours(t)  # (length, 3)
    bar = (
        np.repeat(strip[:, None], thickness, axis=1)
        if vertical
        else np.repeat(strip[None], thickness, axis=0)
    )
    bar = bar.astype(np.uint8)
    bar[0, :], bar[-1, :], bar[:, 0], bar[:, -1] = OUTLINE, OUTLINE, OUTLINE, OUTLINE
    return bar


def labelled_colour_bar(
    colours: Callable[[np.ndarray], np.ndarray],
    low: str,
    high: str,
    size: int,
    *,
    length: int,
    middle: str | None = None,
) -> np.ndarray:
    """A vertical :func:`colour_bar` ``length`` pixels high with ``high`` at its top and ``low`` at its
    bottom (and ``middle`` half-way), e.g. the depth range in metres."""
    lh = line_height(size)
    bar = colour_bar(colours, length=length, thickness=max(8, size))
    labels = [(0, high), (max(0, length - lh), low)]
    if middle is not None and length >= 3 * lh:
        labels.append(((length - lh) // 2, middle))
    width = max(text_width(t, size) for _, t in labels) + 4
    ticks = blank(length, width)
    for y, text in labels:
        block = text_block([text], size, height=lh, pad=1)
        ticks[y : y + lh, : block.shape[1]] = block[: min(lh, length - y), :width]
    return hstack([bar, ticks], gap=3)


def labelled_horizontal_bar(
    colours: Callable[[np.ndarray], np.ndarray], caption: str, low: str, high: str, size: int, *, length: int
) -> np.ndarray:
    """``caption  low [gradient] high``: a horizontal :func:`colour_bar` ``length`` pixels long."""
    lh = line_height(size)
    bar = vstack([blank(2, length), colour_bar(colours, length=length, thickness=lh - 4, vertical=False)])
    return hstack(
        [
            text_block([caption], size, height=lh),
            text_block([low], size, height=lh),
            bar,
            text_block([high], size, height=lh),
        ],
        gap=3,
    )
