"""Losses used by the dense-prediction tasks, all masked by their ignore values.

Each returns a scalar that is exactly zero (with a gradient path) when a batch has no
valid pixel, so images without annotation for a task (e.g. PASCAL human parts on an
image without people) never produce NaN. The entropies at the end are the label-free
objectives of the classification tasks (AdaMerging, :meth:`mtl.tasks.Task.label_free_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over pixels whose label is not ``ignore_index``."""
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    n = (target != ignore_index).sum()
    return loss / n.clamp(min=1)


def balanced_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Class-balanced binary cross-entropy (Xie & Tu, HED, ICCV 2015).

    ``loss = -[w·t·log σ(x) + (1 − w)(1 − t)·log(1 − σ(x))]`` averaged over valid pixels.

    Args:
        logits: ``B × 1 × H × W`` logits.
        target: ``B × 1 × H × W`` binary target, ``ignore_index`` where unlabelled.
        pos_weight: weight ``w`` of positives; ``None`` uses the batch's fraction of
            negatives (the HED balancing). Edges use 0.95 in the field (= pos_weight 19
            in ``BCEWithLogits`` terms, up to the overall scale).
        ignore_index: target value to ignore.
    """
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).float()
    if pos_weight is None:
        n_valid = valid.sum().clamp(min=1)
        w = ((1 - t) * valid).sum() / n_valid
    else:
        w = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    logits = logits.float()
    loss = -(w * t * F.logsigmoid(logits) + (1 - w) * (1 - t) * F.logsigmoid(-logits))
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 averaged over valid elements.

    Args:
        pred: ``B × C × H × W`` prediction.
        target: same shape as ``pred``.
        valid: ``B × 1 × H × W`` boolean mask, broadcast over channels.
    """
    valid = valid.expand_as(pred)
    return ((pred.float() - target.float()).abs() * valid).sum() / valid.sum().clamp(min=1)


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy of the softmax over dim 1, divided by log K (in [0, 1])."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean() / math.log(logits.shape[1])


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of σ(z) (= softplus(z) − z·σ(z)), divided by log 2 (in [0, 1])."""
    z = logits.float()
    return (F.softplus(z) - z * torch.sigmoid(z)).mean() / math.log(2.0)
