"""Synthetic indoor-scene dataset with exact ground truth for six dense prediction tasks.

Samples are rendered on the fly by :func:`mtl.data.synthetic.render.render_scene` (a vectorised
numpy ray caster of a furnished box room with an optional articulated "figure"), so the dataset
needs no files on disk and every label is exact. The raw sample dict uses the decoded encodings
of the real datasets (NYUD-v2 / PASCAL-Context): see :func:`render_scene` for the keys.

Example:
    >>> ds = SyntheticScenes(split="val", length=8, resolution=(96, 128), tasks=("semseg", "depth"))
    >>> sorted(ds[0])
    ['depth', 'image', 'meta', 'semseg']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mtl.data.base import DenseDataset
from mtl.data.synthetic.render import render_scene
from mtl.data.synthetic.scene import CLASSES, PARTS, SceneParams

SPLITS: tuple[str, ...] = ("train", "val", "test")


class SyntheticScenes(DenseDataset):
    """Procedurally rendered indoor scenes (deterministic per split, seed and index).

    Each split is an independent stream of scenes (its render seed is drawn from ``(seed, split)``),
    so ``test`` (``eval.split=test``) holds scenes that neither training nor the choice of
    ``best.ckpt`` on ``val`` has seen.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split is an independent stream.
        length: Number of samples.
        resolution: Image size ``(H, W)``.
        seed: Base seed; the effective render seed is derived from ``(seed, split)``.
        tasks: Subset of :attr:`TASKS` to return (default: all). ``image`` and ``meta`` are
            always returned.
        transform: Optional callable applied to the raw numpy sample dict.
        return_instance: Also return the ``instance`` id map (uint16).
        **scene_params: Scene distribution knobs, see :class:`SceneParams`.

    Raises:
        ValueError: On an unknown split or task, a non-positive length or a bad resolution.
        TypeError: On an unknown scene parameter.
    """

    KEY = "synthetic"
    TASKS = ("semseg", "human_parts", "saliency", "normals", "depth", "edge")
    CLASS_NAMES = {"semseg": CLASSES, "human_parts": ("background", *PARTS)}
    NUM_CLASSES = {t: len(names) for t, names in CLASS_NAMES.items()}
    SPLITS = SPLITS
    # EDGE_MAX_DIST: NYUD-v2's (the default)

    def __init__(
        self,
        *,
        split: str = "train",
        length: int = 1000,
        resolution: tuple[int, int] = (128, 128),
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        return_instance: bool = False,
        **scene_params: Any,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if (
            not isinstance(resolution, Sequence)
            or len(resolution) != 2
            or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in resolution)
            or min(resolution) <= 0
        ):
            raise ValueError(f"resolution must be two positive ints (H, W), got {resolution!r}")
        tasks = self.TASKS if tasks is None else tuple(tasks)
        unknown = [t for t in tasks if t not in self.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available tasks: {self.TASKS}")
        self.params = SceneParams(**scene_params)  # validates the scene parameters early
        self.scene_params = dict(scene_params)
        self.split, self.length, self.seed = split, int(length), int(seed)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.tasks, self.transform, self.return_instance = tasks, transform, return_instance
        # Disjoint, reproducible streams per (seed, split).
        ss = np.random.SeedSequence([self.seed, SPLITS.index(split), 0x5CE7E])
        self.stream_seed = int(ss.generate_state(1)[0])
        self._keep = {"image", "meta", *tasks} | ({"instance"} if return_instance else set())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        index %= self.length
        h, w = self.resolution
        raw = render_scene(self.stream_seed, index, height=h, width=w, **self.scene_params)
        sample = {k: v for k, v in raw.items() if k in self._keep}
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, length={self.length}, "
            f"resolution={self.resolution}, seed={self.seed}, tasks={self.tasks})"
        )
