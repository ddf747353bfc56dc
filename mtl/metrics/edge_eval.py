"""Exact boundary odsF / oisF / AP over a split (SEISM protocol), in parallel worker processes.

Protocol: J. Pont-Tuset, F. Marques, "Supervised Evaluation of Image Segmentation and Object
Proposal Techniques", TPAMI 2016 (SEISM), with the BSDS definitions of ODS, OIS and AP
(D. Martin et al., TPAMI 2004; P. Arbeláez et al., "Contour Detection and Hierarchical Image
Segmentation", TPAMI 2011). Per-image work is :func:`mtl.metrics.seism.evaluate_pair`.

Aggregation over the split, from each image's ``T × 4`` count table
(matched GT, GT, matched predicted, predicted):

* ODS: counts summed over images per threshold; ``R = ΣmatchedGT / ΣGT``,
  ``P = Σmatchedpred / Σpred``, ``F = 2PR / (P + R)``; odsF = max over the 101 thresholds.
* OIS: each image's own best threshold (max of its F, first on ties); the counts at those
  thresholds are summed over images and turned into one F.
* AP: BSDS's area under the pooled precision–recall curve: precision interpolated linearly
  at recall 0, 0.01, …, 1 over the unique recalls (zero outside their range), times 0.01.
* No interpolation between thresholds for odsF/oisF (SEISM takes the maximum over its
  thresholds; the BSDS scripts additionally interpolate, which can only raise F slightly).

Predictions are 8-bit (``round(255·sigmoid(logit))``, as the PNG files of the field are),
cropped to the unpadded region (the bounding box of target pixels ≠ ``ignore_index``).
Images are sent to a process pool as they arrive (``workers`` processes; 0 = in-process) and
only their count tables come back, so memory stays at a few in-flight maps. States are sums
(``dist_reduce_fx="sum"``): under DDP every rank evaluates its own images and the counts are
pooled exactly.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch
from torchmetrics import Metric

from mtl.metrics.seism import GT, MATCHED_GT, MATCHED_PRED, PRED, THRESHOLDS, evaluate_pair


def _pr(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F (β = 1) of count rows ``(..., 4)``; BSDS: 0/0 counts as 0."""
    counts = counts.astype(np.float64)
    r = counts[..., MATCHED_GT] / np.where(counts[..., GT] == 0, 1, counts[..., GT])
    p = counts[..., MATCHED_PRED] / np.where(counts[..., PRED] == 0, 1, counts[..., PRED])
    s = p + r
    f = 2 * p * r / np.where(s == 0, 1, s)
    return p, r, f


def average_precision(p: np.ndarray, r: np.ndarray) -> float:
    """BSDS AP: precision interpolated at recall 0:0.01:1 over the unique recalls, summed × 0.01."""
    ru, idx = np.unique(r, return_index=True)
    if ru.size < 2:
        return 0.0
    grid = np.linspace(0.0, 1.0, 101)
    pi = np.interp(grid, ru, p[idx], left=np.nan, right=np.nan)
    return float(np.nan_to_num(pi, nan=0.0).sum() * 0.01)


def scores_from_counts(counts: np.ndarray, ois_counts: np.ndarray) -> dict[str, float]:
    """odsF, oisF, AP (and the ODS threshold, precision, recall) from pooled counts."""
    p, r, f = _pr(counts)
    best = int(np.argmax(f))
    _, _, f_ois = _pr(ois_counts)
    return {
        "odsf": float(f[best]),
        "oisf": float(f_ois),
        "ap": average_precision(p, r),
        "ods_threshold": float(THRESHOLDS[best]),
        "ods_precision": float(p[best]),
        "ods_recall": float(r[best]),
    }


def best_image_counts(table: np.ndarray) -> np.ndarray:
    """The row of one image's count table at its own best-F threshold (OIS)."""
    _, _, f = _pr(table)
    return table[int(np.argmax(f))]


def valid_crop(target: torch.Tensor, ignore_index: int) -> tuple[slice, slice]:
    """Bounding box of the non-ignored pixels of an ``H × W`` target (the unpadded image)."""
    valid = target != ignore_index
    rows, cols = torch.nonzero(valid.any(dim=1)).flatten(), torch.nonzero(valid.any(dim=0)).flatten()
    if rows.numel() == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


class SEISMEdgeF(Metric):
    """Exact boundary odsF / oisF / AP (SEISM protocol) pooled over the split.

    Args:
        max_dist: matching tolerance, fraction of the image diagonal (NYUD-v2 0.011,
            PASCAL-Context 0.0075).
        workers: worker processes for the per-image evaluation (0: in this process).
        start_method: multiprocessing start method of the workers (``forkserver`` avoids
            forking a process that holds torch / BLAS threads).
        ignore_index: target value of padding / unlabelled pixels.
        max_pending: images in flight before ``update`` waits (default ``4 × workers``).
    """

    full_state_update = False

    def __init__(
        self,
        *,
        max_dist: float = 0.011,
        workers: int = 0,
        start_method: str = "forkserver",
        ignore_index: int = 255,
        max_pending: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < max_dist < 1:
            raise ValueError(f"max_dist is a fraction of the image diagonal in (0, 1), got {max_dist}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method '{start_method}' not in {mp.get_all_start_methods()}")
        self.max_dist = float(max_dist)
        self.workers = int(workers)
        self.start_method = start_method
        self.ignore_index = ignore_index
        self.max_pending = max_pending or 4 * max(self.workers, 1)
        n = len(THRESHOLDS)
        self.add_state("counts", default=torch.zeros(n, 4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ois_counts", default=torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    # ------------------------------------------------------------------ pool
    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context(self.start_method)
            if self.start_method == "forkserver":
                ctx.set_forkserver_preload(["mtl.metrics.seism"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    def _add(self, table: np.ndarray) -> None:
        self.counts += torch.from_numpy(table).to(self.counts.device)
        self.ois_counts += torch.from_numpy(best_image_counts(table)).to(self.ois_counts.device)
        self.n_images += 1

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._add(self._pending.popleft().result())

    def _shutdown(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pool"], state["_pending"] = None, deque()
        return state

    # ---------------------------------------------------------------- metric
    def update(
        self, logits: torch.Tensor, target: torch.Tensor, label_map: torch.Tensor | None = None
    ) -> None:
        """Adds ``B × 1 × H × W`` logits and binary (0/1, 255 = padding) targets.

        ``label_map`` (``B × H × W``, optional): the label map the ground-truth boundaries are
        drawn from (PASCAL-Context's full LabelMap); without it the binary target is read as
        the label map (the NYUD-v2 rule).
        """
        if logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(f"edge logits must be B × 1 × H × W, got {tuple(logits.shape)}")
        prob = torch.sigmoid(logits.detach().float())[:, 0]
        pred_u8 = torch.floor(prob * 255 + 0.5).to(torch.uint8).cpu()  # MATLAB im2uint8 rounding
        target = target.detach().reshape(prob.shape).cpu()
        for b in range(prob.shape[0]):
            rs, cs = valid_crop(target[b], self.ignore_index)
            p = pred_u8[b, rs, cs].numpy()
            if p.size == 0:
                continue
            t = target[b, rs, cs]
            if label_map is not None:
                gt = label_map[b].detach().cpu()[rs, cs].numpy().astype(np.int32)
            else:
                gt = (
                    torch.where(t == self.ignore_index, 0, (t > 0.5).to(torch.uint8)).numpy().astype(np.uint8)
                )
            if self.workers == 0:
                self._add(evaluate_pair(p, gt, self.max_dist))
            else:
                self._pending.append(self._executor().submit(evaluate_pair, p.copy(), gt, self.max_dist))
                self._drain(keep=self.max_pending)

    def sync(self, *args, **kwargs) -> None:
        """Collects the in-flight images of this rank before the states are reduced."""
        self._drain()
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``odsf``, ``oisf``, ``ap`` and ``ods_threshold``, ``ods_precision``, ``ods_recall``."""
        self._drain()
        self._shutdown()
        scores = scores_from_counts(self.counts.cpu().numpy(), self.ois_counts.cpu().numpy())
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()}

    def reset(self) -> None:
        self._shutdown()
        super().reset()
