"""Exact boundary odsF / oisF / AP over a split (SEISM protocol), in parallel worker processes.

Protocol: J. Pont-Tuset, F. Marques, "Supervised Evaluation of Image Segmentation and Object
Proposal Techniques", TPAMI 2016 (SEISM, github.com/jponttuset/seism), with the BSDS definitions
of ODS, OIS and AP (D. Martin et al., TPAMI 2004; P. Arbeláez et al., "Contour Detection and
Hierarchical Image Segmentation", TPAMI 2011). Per-image work is
:func:`mtl.metrics.seism.evaluate_pair`.

Aggregation over the split from each image's ``T × 4`` count table (matched GT ``cntR``, GT
``sumR``, matched predicted ``cntP``, predicted ``sumP``), as SEISM's ``gather_measure.m``,
``general_ods.m``, ``general_ois.m`` and ``general_ap.m`` compute it:

* precision and recall of pooled counts: ``R = cntR / sumR``, ``P = cntP / sumP`` where
  ``sumP ≠ 0`` and ``cntR ≠ 0``; where a threshold predicts no pixel (``sumP = 0``):
  **P = 1**, R = 0; where there is no ground truth (``sumR = 0``): R = 1, P = 0; otherwise
  (predictions, none matched) P = R = 0. ``F = 2PR / (P + R)``, 0 when ``P + R = 0``.
* ODS: counts summed over images per threshold; odsF = the largest F over the 101 thresholds
  (the first on ties), no interpolation between thresholds.
* OIS: each image's best threshold by its own F (``eval_cont.m``: the same rules per image),
  the F values as SEISM's result files hold them (``%f``: 6 decimals), the first on ties;
  the counts at those thresholds are summed over images and turned into one F.
* AP: the recalls of the 101 thresholds made unique (each keeps the precision of its first
  occurrence in threshold order, i.e. the lowest threshold, as MATLAB's ``unique``), the
  precision interpolated linearly at recall 0, 0.01, …, 1 (``interp1``; nothing outside the
  recall range), the defined values summed and divided by 100; 0 with fewer than two distinct
  recalls. A split whose high thresholds predict nothing thus ends its curve at (R 0, P 1).

Predictions are the field's 8-bit PNGs: ``uint8(255 / (1 + exp(−logit)))`` in float32, a
truncation (Multi-Task-Transformer's ``get_output`` and ``save_model_pred_for_one_task`` write
``astype(np.uint8)``), cropped to the unpadded region (the bounding box of target pixels ≠
``ignore_index``). Images are sent to a process pool as they arrive (``workers`` processes;
0 = in-process) and only their count tables come back, so memory stays at a few in-flight maps.
This is host work by nature: on a GPU, ``update`` quantises the prediction on the device and moves
each batch's 8-bit prediction, target and label map to the CPU once (one copy each), and each
image's count table is added to the states on their device; ``compute`` reads the pooled counts
once and returns its values on the states' device.
States are sums (``dist_reduce_fx="sum"``): under DDP every rank evaluates its own images and the
counts are pooled exactly.

Progress (the evaluation takes minutes on a full split): images done / total, rate, elapsed time
and ETA, as a ``tqdm`` bar on a terminal or a log line every ``progress_interval`` seconds otherwise
(:class:`mtl.progress.Progress`; rank 0 reports its share). The total comes from
:class:`mtl.progress.ProgressLog` at the start of the test (:meth:`SEISMEdgeF.expect_images`).
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch
from torchmetrics import Metric

from mtl.metrics.seism import GT, MATCHED_GT, MATCHED_PRED, PRED, THRESHOLDS, evaluate_pair
from mtl.progress import Mode, Progress, ReportsProgress, check_mode


def _pr(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F (β = 1) of count rows ``(..., 4)`` by SEISM's rules (module doc)."""
    c = counts.astype(np.float64)
    cnt_r, sum_r, cnt_p, sum_p = c[..., MATCHED_GT], c[..., GT], c[..., MATCHED_PRED], c[..., PRED]
    general = (sum_p != 0) & (cnt_r != 0)
    r = np.where(general, cnt_r / np.where(general, sum_r, 1.0), 0.0)
    p = np.where(general, cnt_p / np.where(general, sum_p, 1.0), 0.0)
    no_gt = (sum_r == 0) & (cnt_p == 0)
    r, p = np.where(no_gt, 1.0, r), np.where(no_gt, 0.0, p)
    no_pred = (sum_p == 0) & (cnt_r == 0)  # applied last, as in gather_measure.m
    r, p = np.where(no_pred, 0.0, r), np.where(no_pred, 1.0, p)
    s = p + r
    f = np.where(s == 0, 0.0, 2 * p * r / np.where(s == 0, 1.0, s))
    return p, r, f


def average_precision(p: np.ndarray, r: np.ndarray) -> float:
    """SEISM's AP (``general_ap.m``): precision at the unique recalls (first occurrence), linearly
    interpolated at recall 0:0.01:1, the values inside the recall range summed, ÷ 100."""
    ru, idx = np.unique(r, return_index=True)
    if ru.size < 2:
        return 0.0
    grid = np.linspace(0.0, 1.0, 101)
    pi = np.interp(grid, ru, p[idx], left=np.nan, right=np.nan)
    total = 0.0
    for v in pi[~np.isnan(pi)]:  # summed in order, as MATLAB's sum of a short vector
        total += float(v)
    return total / 100


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
    """The row of one image's count table at its own best-F threshold (OIS): F as SEISM's result
    files print it (``%f``), the first threshold on ties."""
    _, _, f = _pr(table)
    printed = np.array([float(f"{v:f}") for v in f])
    return table[int(np.argmax(printed))]


def to_8bit(logits: torch.Tensor) -> torch.Tensor:
    """The field's 8-bit edge PNG of logits: ``255 / (1 + exp(−x))`` in float32, truncated to uint8."""
    return (255.0 / (1.0 + torch.exp(-logits.float()))).to(torch.uint8)


def valid_crop(target: torch.Tensor, ignore_index: int) -> tuple[slice, slice]:
    """Bounding box of the non-ignored pixels of an ``H × W`` target (the unpadded image)."""
    valid = target != ignore_index
    rows, cols = torch.nonzero(valid.any(dim=1)).flatten(), torch.nonzero(valid.any(dim=0)).flatten()
    if rows.numel() == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


class SEISMEdgeF(Metric, ReportsProgress):
    """Exact boundary odsF / oisF / AP (SEISM protocol) pooled over the split.

    Args:
        max_dist: matching tolerance, fraction of the image diagonal (NYUD-v2 0.011,
            PASCAL-Context 0.0075).
        workers: worker processes for the per-image evaluation (0: in this process).
        start_method: multiprocessing start method of the workers (``forkserver`` avoids
            forking a process that holds torch / BLAS threads).
        ignore_index: target value of padding / unlabelled pixels.
        max_pending: images in flight before ``update`` waits (default ``4 × workers``).
        progress: ``auto`` (a bar on a terminal, log lines otherwise), ``always`` (log lines) or
            ``never``.
        progress_interval: seconds between two progress lines.
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
        progress: Mode = "auto",
        progress_interval: float = 20.0,
    ) -> None:
        super().__init__()
        check_mode(progress, "eval.edge.progress")
        if progress_interval <= 0:
            raise ValueError(f"eval.edge.progress_interval must be > 0 seconds, got {progress_interval}")
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
        where = f", {self.workers} worker processes" if self.workers else ", in-process"
        self.progress = Progress("edge odsF (SEISM)", mode=progress, interval=progress_interval, note=where)

    def expect_images(self, n: int | None) -> None:
        """The number of images this process will evaluate (the progress report's total)."""
        self.progress.set_total(n)

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
        self.progress.update()

    def _drain(self, keep: int = 0) -> None:
        """Adds the finished images in order, waiting until at most ``keep`` are in flight."""
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
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
        state["progress"] = Progress(
            self.progress.desc,
            mode=self.progress.mode,
            interval=self.progress.interval,
            note=self.progress.note,
        )
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
        self.progress.start()  # the first line at once: the worker processes take a while to start
        # the host work (SEISM's matching) needs the maps on the CPU: each input crosses once per batch
        pred_u8 = to_8bit(logits.detach()[:, 0]).cpu()  # quantised on the device: 1 byte per pixel
        target = target.detach().reshape(pred_u8.shape).cpu()
        label_map = label_map.detach().cpu() if label_map is not None else None
        for b in range(pred_u8.shape[0]):
            rs, cs = valid_crop(target[b], self.ignore_index)
            p = pred_u8[b, rs, cs].numpy()
            if p.size == 0:
                self.progress.update()  # an image without valid pixels: nothing to match
                continue
            t = target[b, rs, cs]
            if label_map is not None:
                gt = label_map[b, rs, cs].numpy().astype(np.int32)
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
        """Returns ``odsf``, ``oisf``, ``ap`` and ``ods_threshold``, ``ods_precision``, ``ods_recall``,
        on the states' device like every other metric's values (the scores are computed on the host)."""
        self._drain()
        self._shutdown()
        self.progress.close()
        scores = scores_from_counts(self.counts.cpu().numpy(), self.ois_counts.cpu().numpy())
        values = torch.tensor(list(scores.values()), dtype=torch.float64).to(self.counts.device)
        return {k: v.float() for k, v in zip(scores, values, strict=True)}

    def reset(self) -> None:
        self._shutdown()
        self.progress.close()
        super().reset()
