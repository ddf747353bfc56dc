"""The pretraining corpus: synthetic scenes disjoint from every evaluation stream, with more variety.

:class:`SyntheticCorpus` is :class:`~mtl.data.synthetic.dataset.SyntheticScenes` with two changes:

* its render streams are drawn from ``(seed, split, CORPUS_TAG)`` instead of ``(seed, split,
  SCENES_TAG)``: a scene is fixed by ``(stream seed, index)``, so as long as no corpus stream
  seed equals a :class:`SyntheticScenes` stream seed, no corpus scene is an evaluation scene, for
  any ``seed`` (``tests/test_pretrain.py`` checks the seeds 0–999 of every split);
* sample ``i`` is drawn from the scene distribution ``VARIANTS[i % len(VARIANTS)]`` (knobs of
  :class:`~mtl.data.synthetic.scene.SceneParams`): the default rooms, a wider camera motion, cluttered
  rooms, and large sparse rooms with a figure in most images.

``mtl.pretrain`` trains the backbones on it (``docs/pretraining.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtl.data.synthetic.dataset import SPLITS, SyntheticScenes
from mtl.data.synthetic.render import render_scene
from mtl.data.synthetic.scene import SceneParams

#: the last entropy word of :class:`SyntheticScenes`' stream seeds
SCENES_TAG = 0x5CE7E
#: the last entropy word of the corpus's stream seeds (differs from ``SCENES_TAG``)
CORPUS_TAG = 0xC0A905
#: the scene distributions the corpus cycles through (``SceneParams`` knobs)
VARIANTS: tuple[dict[str, Any], ...] = (
    {},
    {"fov_deg": 55.0, "max_yaw_deg": 35.0, "pitch_deg": (-35.0, 0.0), "max_roll_deg": 6.0,
     "camera_height": (0.8, 2.0)},
    {"fov_deg": 75.0, "num_objects": (6, 12), "table_prob": 0.8, "max_paintings": 4},
    {"num_objects": (1, 4), "figure_prob": 0.9, "room_width": (4.0, 8.0), "room_depth": (5.0, 9.0),
     "room_height": (2.4, 3.8), "hole_fraction": 0.05},
)  # fmt: skip


def stream_seed(seed: int, split: str, tag: int) -> int:
    """The render stream seed of ``(seed, split)`` under a domain ``tag`` (as :class:`SyntheticScenes`)."""
    return int(np.random.SeedSequence([int(seed), SPLITS.index(split), int(tag)]).generate_state(1)[0])


class SyntheticCorpus(SyntheticScenes):
    """Synthetic scenes for pretraining: other render streams than the evaluation scenes, several
    scene distributions.

    Args:
        variants: the scene distributions, cycled by sample index (default :data:`VARIANTS`);
            keyword arguments given directly (``**scene_params``) apply to every variant.
        **kwargs: as :class:`SyntheticScenes` (``split``, ``length``, ``resolution``, ``seed``,
            ``tasks``, ``transform``, …).
    """

    def __init__(self, *, variants: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.variants = [
            {**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(var).items()}, **self.scene_params}
            for var in (VARIANTS if variants is None else variants)
        ]
        if not self.variants:
            raise ValueError("SyntheticCorpus: variants must hold at least one scene distribution")
        for var in self.variants:
            SceneParams(**var)  # unknown or out-of-range knobs raise here, not at the first sample
        self.stream_seed = stream_seed(self.seed, self.split, CORPUS_TAG)

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        index %= self.length
        h, w = self.resolution
        raw = render_scene(
            self.stream_seed, index, height=h, width=w, **self.variants[index % len(self.variants)]
        )
        sample = {k: v for k, v in raw.items() if k in self._keep}
        return self.transform(sample) if self.transform is not None else sample
