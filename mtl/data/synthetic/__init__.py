"""Procedurally rendered indoor scenes with exact ground truth (no files on disk).

The public surface is the dataset and what describes its samples; the modules inside are one
stage of the renderer each and talk through public names only:

* :mod:`~mtl.data.synthetic.geometry`: pinhole camera, rays, primitive intersections;
* :mod:`~mtl.data.synthetic.texture`: materials and procedural textures;
* :mod:`~mtl.data.synthetic.scene`: class / part vocabularies, :class:`SceneParams`, scene sampling;
* :mod:`~mtl.data.synthetic.render`: :func:`render_scene`, ray casting, shading, ground-truth maps;
* :mod:`~mtl.data.synthetic.dataset`: :class:`SyntheticScenes`.
"""

from mtl.data.synthetic.dataset import SPLITS, SyntheticScenes
from mtl.data.synthetic.render import render_scene
from mtl.data.synthetic.scene import CLASSES, NUM_PARTS, PARTS, ROOM_CLASSES, SceneParams

__all__ = [
    "CLASSES",
    "NUM_PARTS",
    "PARTS",
    "ROOM_CLASSES",
    "SPLITS",
    "SceneParams",
    "SyntheticScenes",
    "render_scene",
]
