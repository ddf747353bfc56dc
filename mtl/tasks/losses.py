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
    """Pixel-wise cross-entropy averaged over pixels whose label is not ``ignore_index``.

    The sum over the valid pixels divided by their number (at least 1), as the
    Multi-Task-Transformer code's ``CrossEntropyLoss`` reduces it. Computed in float32 whatever
    the logits' dtype (autocast does the same; bf16 logits outside autocast would otherwise sum
    every pixel's loss in bf16).
    """
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
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

    This is what the Multi-Task-Transformer code (``losses/loss_functions.py``) computes for both
    binary tasks:

    * edge, ``BalancedBinaryCrossEntropyLoss(pos_weight=0.95)``: ``BCEWithLogits`` with
      ``pos_weight = w/(1 − w) = 19``, mean over the valid pixels, divided by ``1/(1 − w) = 20``;
    * saliency, ``CrossEntropyLoss(balanced=True)`` on two channels: class weights
      ``(1 − w, w)`` with ``w`` the batch's fraction of negatives among the valid pixels, summed and
      divided by the number of valid pixels (not by the summed weights). With one logit
      ``x = z₁ − z₀`` this is the formula above, since ``softmax(z)₁ = σ(z₁ − z₀)``.

    Deliberate difference: a batch without a valid pixel gives 0 (with a gradient path) here, where
    the reference's edge loss gives NaN (the mean of nothing).

    Args:
        logits: ``B × 1 × H × W`` logits.
        target: ``B × 1 × H × W`` binary target, ``ignore_index`` where unlabelled.
        pos_weight: weight ``w`` of positives; ``None`` uses the batch's fraction of
            negatives (the HED balancing). Edges use 0.95 in the field (= pos_weight 19
            in ``BCEWithLogits`` terms, up to the overall scale 1/20).
        ignore_index: target value to ignore.
    """
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).float()
    logits = logits.float()  # everything in float32: a bf16 weight 0.95 would be 0.9492
    if pos_weight is None:
        n_valid = valid.sum().clamp(min=1)
        w = ((1 - t) * valid).sum() / n_valid
    else:
        # float32 on the logits' device, written by a fill (no host-to-device copy)
        w = torch.full((), float(pos_weight), dtype=torch.float32, device=logits.device)
    loss = -(w * t * F.logsigmoid(logits) + (1 - w) * (1 - t) * F.logsigmoid(-logits))
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 summed over the channels and averaged over the valid *pixels*.

    ``Σ_{valid p} Σ_c |pred_c(p) − target_c(p)| / #valid pixels``, as the L1 loss of the
    Multi-Task-Transformer code (``losses/loss_functions.py``, ``L1Loss``) reduces it: for the
    3 channels of the normals the loss is 3× a per-element mean. Depth (one channel) is the
    same either way.

    Args:
        pred: ``B × C × H × W`` prediction.
        target: same shape as ``pred``.
        valid: ``B × 1 × H × W`` boolean mask, broadcast over channels.
    """
    diff = (pred.float() - target.float()).abs().sum(dim=1, keepdim=True)
    return (diff * valid).sum() / valid.sum().clamp(min=1)


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy of the softmax over dim 1, divided by log K (in [0, 1])."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean() / math.log(logits.shape[1])


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of σ(z) (= softplus(z) − z·σ(z)), divided by log 2 (in [0, 1])."""
    z = logits.float()
    return (F.softplus(z) - z * torch.sigmoid(z)).mean() / math.log(2.0)
