"""Decoders: :class:`~mtl.contracts.Decoder` — ``forward(feats, *, tasks) -> DecoderOutput``.

Task-specific modules live in the ``per_task`` ``nn.ModuleDict`` (keyed by task), everything else
in the decoder is shared between tasks; strategies rely on this split.
"""

from mtl.decoders.multihead import MultiHeadDecoder

__all__ = ["MultiHeadDecoder"]
