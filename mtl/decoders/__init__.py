"""Decoders: ``forward(feats, *, task_subset=None) -> dict[task, B×D×h×w]``.

Convention shared by every decoder: task-specific modules live in an ``nn.ModuleDict``
attribute named ``per_task`` (keyed by task), everything else in the decoder is shared
between tasks. Strategies rely on this split.
"""

from mtl.decoders.multihead import MultiHeadDecoder

__all__ = ["MultiHeadDecoder"]
