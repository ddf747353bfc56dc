"""AdaMerging: layer-wise merging coefficients learned without labels.

E. Yang, Z. Wang, L. Shen, S. Liu, G. Guo, X. Wang, D. Tao, "AdaMerging: Adaptive Model Merging
for Multi-Task Learning", ICLR 2024.

The merged shared weights are θ_l(λ) = θ0_l + Σ_t λ_{t,l} τ_{t,l}: one coefficient per task t
and per layer l (here: per parameter tensor, as the paper's layer-wise variant), initialised at
``init`` (the paper: 0.3) and learned with Adam on *unlabelled* images by minimising an
unsupervised surrogate of every task's loss, then clipped to [0, 1]. The model is run through
``torch.func.functional_call`` so θ(λ) stays a differentiable function of λ.

The paper minimises the Shannon entropy of classification outputs. For dense prediction each
task defines its label-free objective (:meth:`mtl.tasks.Task.label_free_loss`, and
:attr:`~mtl.tasks.Task.label_free_needs_reference` when it compares with the single-task
model's prediction); the built-in ones, averaged over pixels of the unlabelled batch (each term
lies in [0, 1] or near it, so tasks weigh alike), are:

* ``semseg``, ``human_parts`` (K-way softmax): entropy / log K;
* ``saliency``, ``edge`` (one logit): binary entropy / log 2;
* ``depth``: relative L1 agreement with the single-task model's own prediction d_st,
  Σ|d − d_st| / Σ|d_st| (regression outputs have no entropy; the single-task model is the only
  label-free reference);
* ``normals``: 1 − cos(n, n_st), the mean angular disagreement with the single-task model.

The single-task predictions are computed once, before the optimisation, one checkpoint at a
time. Memory: θ0 and the T task vectors of the shared weights (T + 1 backbones) plus one batch's
activations; the decoder branches and heads are the single-task ones and stay fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call

from mtl.merging.base import MergeMethod, task_vector
from mtl.tasks.base import Task

log = logging.getLogger(__name__)


def unsupervised_loss(task: Task, pred: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """The label-free objective of one task (see the module docstring).

    Raises:
        ValueError: the task needs the single-task model's prediction and ``reference`` is ``None``,
            or it defines no label-free objective.
    """
    if task.label_free_needs_reference and reference is None:
        raise ValueError(f"task '{task.name}' needs the single-task model's predictions")
    try:
        return task.label_free_loss(pred, reference)
    except NotImplementedError as err:
        raise ValueError(f"AdaMerging has no unsupervised objective: {err}") from err


def _strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.x`` keys of an MTLModule state → ``x`` keys of its MultiTaskNet."""
    return {k[len("model.") :]: v for k, v in state.items()}


class AdaMerging(MergeMethod):
    """Layer-wise AdaMerging with entropy / single-task-agreement objectives.

    Args:
        steps: Adam steps (the paper: 500 at lr 1e-3; a few dozen at a larger lr suffice here).
        lr: Adam learning rate of the coefficients.
        init: initial value of every coefficient λ_{t,l}.
        batch_size: unlabelled images per step.
        images: number of unlabelled validation images used (the first ones of the split).
    """

    def __init__(
        self, *, steps: int = 50, lr: float = 1e-2, init: float = 0.3, batch_size: int = 8, images: int = 64
    ) -> None:
        for name, v in (("steps", steps), ("batch_size", batch_size), ("images", images)):
            if int(v) < 1:
                raise ValueError(f"method.{name} must be >= 1, got {v}")
        if not float(lr) > 0:
            raise ValueError(f"method.lr must be > 0, got {lr}")
        self.steps, self.lr, self.init = int(steps), float(lr), float(init)
        self.batch_size, self.images = int(batch_size), int(images)
        self.history: list[float] = []
        self.coefficients: dict[str, list[float]] = {}

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Task arithmetic at the initial coefficients (what the optimisation starts from)."""
        return base.float() + self.init * sum(task_vector(base, th) for th in thetas)

    def merge(
        self,
        *,
        base: Mapping[str, torch.Tensor] | None,
        states: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str],
        context: Mapping[str, Any] | None = None,
        out: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Learns λ on ``context["images"]`` with ``context["module"]`` (the merged MTLModule,
        task branches loaded); ``context["tasks_of"][t]`` lists the tasks of ``states[t]`` and
        ``context["shared_keys"]`` every shared key (parameters and buffers). ``out`` is not used:
        the method holds θ0 and all task vectors anyway."""
        if not context or "module" not in context or "images" not in context:
            raise ValueError("AdaMerging needs the merged module and unlabelled images (context)")
        module, images = context["module"], context["images"][: self.images]
        model = module.model.eval()
        tasks = module.tasks
        tasks_of: Sequence[Sequence[str]] = context["tasks_of"]
        shared_keys: Sequence[str] = context.get("shared_keys", keys)
        reference = self._single_task_predictions(model, states, tasks_of, shared_keys, images, tasks)
        taus = [{k: task_vector(base[k], s[k]) for k in keys} for s in states]  # T task vectors
        b = {k: base[k].float() for k in keys}
        device = images.device  # λ and the batch indices live with the data they meet
        coef = torch.full((len(states), len(keys)), self.init, device=device, requires_grad=True)
        opt = torch.optim.Adam([coef], lr=self.lr)
        n = images.shape[0]
        self.history = []
        for step in range(self.steps):
            idx = torch.arange(step * self.batch_size, (step + 1) * self.batch_size, device=device) % n
            params = {
                k[len("model.") :]: b[k] + sum(coef[t, i] * taus[t][k] for t in range(len(states)))
                for i, k in enumerate(keys)
            }
            preds = functional_call(model, params, (images[idx],), strict=False)
            loss = sum(
                unsupervised_loss(
                    tasks[t], preds[t], reference.get(t, {}).get("pred")[idx] if t in reference else None
                )
                for t in tasks
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                coef.clamp_(0.0, 1.0)
            self.history.append(float(loss.detach()))
            if step % 10 == 0 or step == self.steps - 1:
                log.info(
                    "AdaMerging step %d/%d: unsupervised loss %.4f", step + 1, self.steps, self.history[-1]
                )
        lam = coef.detach()
        self.coefficients = {
            "+".join(tasks_of[t]): [round(float(v), 4) for v in lam[t]] for t in range(len(states))
        }
        return {k: b[k] + sum(lam[t, i] * taus[t][k] for t in range(len(states))) for i, k in enumerate(keys)}

    @torch.no_grad()
    def _single_task_predictions(
        self,
        model: torch.nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        tasks_of: Sequence[Sequence[str]],
        shared_keys: Sequence[str],
        images: torch.Tensor,
        tasks: Mapping[str, Task],
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Predictions of the tasks whose objective needs a reference (the regression tasks) by
        their own fine-tuned model, one checkpoint at a time."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for state, names in zip(states, tasks_of, strict=True):
            wanted = [t for t in names if tasks[t].label_free_needs_reference]
            if not wanted:
                continue
            own = _strip({k: state[k] for k in shared_keys})
            preds = [
                functional_call(
                    model, own, (images[i : i + self.batch_size],), {"task_subset": wanted}, strict=False
                )
                for i in range(0, images.shape[0], self.batch_size)
            ]
            for t in wanted:
                out[t] = {"pred": torch.cat([p[t].float() for p in preds])}
        return out

    def describe(self) -> dict[str, Any]:
        info = {k: v for k, v in super().describe().items() if k not in ("history", "coefficients")}
        if self.history:
            info["loss_first"], info["loss_last"] = self.history[0], self.history[-1]
            info["mean_coefficient"] = {t: sum(v) / len(v) for t, v in self.coefficients.items()}
            info["coefficients"] = self.coefficients
        return info
