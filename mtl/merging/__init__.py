"""Model merging: single-task checkpoints → one multi-task checkpoint (``merge.py``).

Methods (one file per family): :class:`WeightAveraging`, :class:`TaskArithmetic`
(Ilharco et al., ICLR 2023), :class:`TIESMerging` (Yadav et al., NeurIPS 2023),
:class:`ModelBreadcrumbs` (Davari & Belilovsky, ECCV 2024), :class:`AdaMerging` (Yang et al.,
ICLR 2024). Loading and verification: :mod:`mtl.merging.io`; the merge itself:
:func:`mtl.merging.run.merge_checkpoints`.
"""

from mtl.merging.adamerging import AdaMerging
from mtl.merging.arithmetic import TaskArithmetic, WeightAveraging
from mtl.merging.base import MergeMethod
from mtl.merging.breadcrumbs import ModelBreadcrumbs
from mtl.merging.ties import TIESMerging

__all__ = [
    "AdaMerging",
    "MergeMethod",
    "ModelBreadcrumbs",
    "TIESMerging",
    "TaskArithmetic",
    "WeightAveraging",
]
