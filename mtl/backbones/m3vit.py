"""M³ViT: a ViT whose MLPs in every other block are task-conditioned mixtures of experts.

Liang et al., "M³ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning
with Model-Accelerator Co-design", NeurIPS 2022; reference code: VITA-Group/M3ViT
(``models/vision_transformer_moe.py``, ``models/models.py``, ``train_fastmoe.py`` and the command
its README gives for the paper's runs). The MoE layer (routers, top-k gating, balancing loss,
sparse dispatch) is :mod:`mtl.backbones.moe_mlp`; this file builds the backbone on a timm ViT
(Dosovitskiy et al., ICLR 2021), so timm's pretrained weights load under timm's names, and runs
it per task.

* Training runs the backbone **once per task with that task's routing** (the paper), giving
  per-task feature lists (:meth:`M3ViT.features`); the blocks before the first MoE block do
  not depend on the task and run once. Tasks listed together in ``task_groups`` share a router
  (``router=per_task``) or a task embedding (``router=task_embedding``); with ``shared_pass``
  (default) a group costs one pass instead of one per task — ``task_groups=[[all tasks]]`` is the
  cheapest (one pass, a task-agnostic MoE ViT, the shared representation "-UB" strategies need).
* Inference for a task subset runs only those tasks' passes (``model.tasks_at_inference``).
* Initialisation: the reference starts from its own MoE-pretrained checkpoint (not public) and
  copies that checkpoint's single gate into every task's gate. Here (``expert_init``)
  ``"upcycle"`` (sparse upcycling, Komatsuzaki et al., ICLR 2023) copies the pretrained dense
  MLP into the experts — with M³ViT's expert hidden width = embedding width each expert takes one
  ``C``-wide slice of the ``4C`` hidden units, slices assigned round-robin; ``"random"``: timm's
  ViT initialisation; ``"auto"``: upcycle when weights are pretrained. Every task's router starts
  from the same weights (``same_router_init``, as the reference's copied gate).
* The balancing loss ``balance_weight · Σ (cv²(importance) + cv²(load))`` (0.01) is **summed**
  over the MoE layers and over the passes (task gates) of a training forward, as the reference
  sums the loss of every gate module (:attr:`~mtl.contracts.Features.aux_loss`).
* Expert usage: every eval-mode forward gives each task's token assignments per expert and MoE
  block (``experts/<task>/layer<i>/usage`` in :attr:`~mtl.contracts.Features.stats`);
  :meth:`M3ViT.finish_stats` turns an evaluation's usage into the logged entropy and largest share.
  The MoE layers also keep a running count for the eval routing report
  (:meth:`M3ViT.routing_counts`, :mod:`mtl.backbones.routing_report`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtl.backbones.moe_mlp import MoEMlp, TaskCode
from mtl.backbones.timm_backbone import TimmBackbone, vit_tokens
from mtl.contracts import FeatureKind, Features

EXPERT_INIT = ("auto", "upcycle", "random")


class M3ViT(TimmBackbone):
    """A :class:`TimmBackbone` ViT with task-conditioned MoE MLPs (module docstring).

    Args:
        tasks: the model's tasks (one route per task or group).
        num_experts: experts per MoE layer ``E`` (16).
        top_k: experts per token ``k`` (4).
        expert_hidden: hidden width of each expert (``None``: the embedding width, as the paper).
        moe_every: replace the MLP of every ``moe_every``-th block (blocks ``moe_every−1``,
            ``2·moe_every−1``, …), ignored when ``moe_blocks`` is given.
        moe_blocks: explicit block indices whose MLP becomes an MoE.
        router: ``"per_task"`` (a router per task, the reference's multi-gate of the paper's runs) or
            ``"task_embedding"`` (one router whose input carries the task, see ``task_embed``).
        task_groups: lists of tasks sharing a route (``None``: every task its own).
        shared_pass: one backbone pass per group instead of per task (same result, cheaper).
        noisy_gating: learned noise on the router logits while training (Shazeer et al.); off
            by default, as the reference's runs (v-MoE gate, noise std 0).
        task_embed: ``router=task_embedding`` only: ``"concat"`` (the reference: a one-hot task
            code through an MLP, :class:`~mtl.backbones.moe_mlp.TaskCode`, shared by all MoE
            layers and concatenated to every token the gates read) or ``"add"`` (a learned vector
            per task and layer added to the token).
        task_embed_dim: width of the concatenated task code (64, the width the reference's
            task-conditioned config names).
        same_router_init: every task's router starts from the same weights (the reference copies
            its pretrained gate into every task's gate); ``False``: independent draws.
        balance_weight: weight of the load-balancing loss (summed over layers and passes).
        expert_init: ``"auto"``, ``"upcycle"`` or ``"random"``.
        dispatch: ``"sparse"`` or ``"dense"`` (see :class:`~mtl.backbones.moe_mlp.MoEMlp`).
        **kwargs: :class:`TimmBackbone` arguments (a timm ``vit_*`` name, taps, ``img_size``, …).
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        num_experts: int = 16,
        top_k: int = 4,
        expert_hidden: int | None = None,
        moe_every: int = 2,
        moe_blocks: Sequence[int] | None = None,
        router: str = "per_task",
        task_groups: Sequence[Sequence[str]] | None = None,
        shared_pass: bool = True,
        noisy_gating: bool = False,
        task_embed: str = "concat",
        task_embed_dim: int = 64,
        same_router_init: bool = True,
        balance_weight: float = 0.01,
        expert_init: str = "auto",
        dispatch: str = "sparse",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.model, VisionTransformer):
            raise ValueError(f"M3ViT needs a timm ViT (blocks with .mlp), got '{self.name}'")
        blocks = self.model.blocks
        if expert_init not in EXPERT_INIT:
            raise ValueError(f"M3ViT expert_init={expert_init!r}; expected one of {EXPERT_INIT}")
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("M3ViT needs at least one task")
        self.groups = self._check_groups(task_groups)
        self.route_key = {t: g[0] for g in self.groups for t in g}  # task → its group's router key
        self.shared_pass = bool(shared_pass)
        self.balance_weight = float(balance_weight)
        n = len(blocks)
        if moe_blocks is None:
            if moe_every < 1:
                raise ValueError(f"M3ViT moe_every must be >= 1, got {moe_every}")
            moe_blocks = list(range(moe_every - 1, n, moe_every))
        self.moe_blocks = sorted({int(i) for i in moe_blocks})
        if not self.moe_blocks or any(not 0 <= i < n for i in self.moe_blocks):
            raise ValueError(
                f"M3ViT moe_blocks {list(moe_blocks)} must be non-empty indices of the {n} blocks kept "
                f"(the last tap is block {n - 1})"
            )
        if expert_init == "auto":
            expert_init = "upcycle" if kwargs.get("pretrained") or kwargs.get("checkpoint_path") else "random"
        dim = int(self.model.embed_dim)
        keys = [g[0] for g in self.groups]
        self.task_code = (
            TaskCode(keys=keys, dim=task_embed_dim)
            if router == "task_embedding" and task_embed == "concat"
            else None
        )
        for i in self.moe_blocks:
            old = blocks[i].mlp
            moe = MoEMlp(
                dim=dim,
                keys=keys,
                num_experts=num_experts,
                hidden=expert_hidden,
                top_k=top_k,
                router=router,
                noisy_gating=noisy_gating,
                task_embed=task_embed,
                task_embed_dim=task_embed_dim,
                same_router_init=same_router_init,
                dispatch=dispatch,
                act_layer=type(old.act),
                drop=float(old.drop1.p),
            )
            moe.upcycle(old) if expert_init == "upcycle" else moe.reset_random()
            blocks[i].mlp = moe
        self.expert_init = expert_init

    def _check_groups(self, task_groups) -> list[list[str]]:
        if task_groups is None:
            return [[t] for t in self.tasks]
        groups = [list(g) for g in task_groups]
        flat = [t for g in groups for t in g]
        if sorted(flat) != sorted(self.tasks) or any(not g for g in groups):
            raise ValueError(
                f"M3ViT task_groups {groups} must list every task {self.tasks} exactly once, "
                "in non-empty groups"
            )
        return groups

    # ------------------------------------------------------------------ structure
    def moe_layers(self) -> dict[int, MoEMlp]:
        """Block index → its MoE MLP."""
        return {i: self.model.blocks[i].mlp for i in self.moe_blocks}

    def passes(self, tasks: Sequence[str]) -> list[list[str]]:
        """The backbone passes that serve ``tasks``: one per task, or per group with ``shared_pass``."""
        unknown = [t for t in tasks if t not in self.route_key]
        if unknown:
            raise ValueError(f"M3ViT has no route for task(s) {unknown}; its tasks are {self.tasks}")
        if not self.shared_pass:
            return [[t] for t in tasks]
        out: dict[str, list[str]] = {}
        for t in tasks:
            out.setdefault(self.route_key[t], []).append(t)
        return list(out.values())

    @property
    def kind(self) -> FeatureKind:
        """``"per_task"`` when tasks see different features (more than one pass for all tasks)."""
        return "per_task" if len(self.passes(self.tasks)) > 1 else "shared"

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's own router (or task embedding) in every MoE layer, when no other task shares it."""
        key = self.route_key[task]
        if sum(1 for t in self.tasks if self.route_key[t] == key) > 1:
            return
        for moe in self.moe_layers().values():
            yield from moe.router.key_parameters(key)

    # ------------------------------------------------------------------ forward
    def _block(
        self, i: int, x: torch.Tensor, key: str | None, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        blk = self.model.blocks[i]
        if not isinstance(blk.mlp, MoEMlp):
            return blk(x), None, None
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        y, balance, usage = blk.mlp.forward_with_usage(blk.norm2(x), key=key, code=code)
        return x + blk.drop_path2(blk.ls2(y)), balance, usage

    def _run(
        self, i: int, x: torch.Tensor, key: str | None, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.model.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block, i, x, key, code, use_reentrant=False)
        return self._block(i, x, key, code)

    def _to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        m = self.model
        tokens = m.norm(tokens) if self.norm else tokens
        return rearrange(tokens[:, m.num_prefix_tokens :], "b (h w) c -> b c h w", h=grid[0], w=grid[1])

    def features(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> Features:
        """The tapped maps (``B × C × H/16 × W/16`` each) of ``tasks`` under their routing.

        Only the passes of ``tasks`` run. Per task (:attr:`kind` ``"per_task"``; tasks served by
        the same pass share one list) or one shared list (one pass serves every task). Training:
        the balancing loss (``aux_loss``: ``balance_weight`` × its sum over MoE layers and passes);
        eval: each task's expert usage per MoE block (``stats``).
        """
        tasks = list(tasks or self.tasks)
        m = self.model
        z, grid = vit_tokens(m, x)  # (B, N, C)
        first = self.moe_blocks[0]
        shared_taps = {}
        for i in range(first):  # task-independent blocks: once for every pass
            z, _, _ = self._run(i, z, None)
            if i in self.out_indices:
                shared_taps[i] = z
        out: dict[str, list[torch.Tensor]] = {}
        balance: list[torch.Tensor] = []
        stats: dict[str, torch.Tensor] = {}
        for group in self.passes(tasks):
            key, h, taps, terms = self.route_key[group[0]], z, dict(shared_taps), []
            code = self.task_code(key) if self.task_code is not None else None
            for i in range(first, len(m.blocks)):
                h, b, usage = self._run(i, h, key, code)
                if b is not None:
                    terms.append(b)
                if usage is not None:  # eval: token assignments per expert, per image
                    stats.update({f"experts/{t}/layer{i}/usage": usage / x.shape[0] for t in group})
                if i in self.out_indices:
                    taps[i] = h
            if terms:
                balance.append(torch.stack(terms).sum())
            feats = [self._to_map(taps[i], grid) for i in self.out_indices]
            out.update({t: feats for t in group})
        # the reference adds up the loss of every gate module used: every layer, every task's gate
        aux = self.balance_weight * torch.stack(balance).sum() if balance and self.balance_weight else None
        if self.kind == "shared":
            return Features(shared=out[tasks[0]], aux_loss=aux, stats=stats)
        return Features(per_task=out, aux_loss=aux, stats=stats)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped maps when one pass serves every task (``task_groups=[[all tasks]]``)."""
        if self.kind == "per_task":
            raise ValueError(
                f"M3ViT routes per task ({len(self.passes(self.tasks))} passes for {self.tasks}): it has no "
                "single task-independent feature list. Use features(x, tasks) (MultiTaskNet does), or "
                "task_groups=[[all tasks]] for one shared pass"
            )
        return self.features(x).shared

    # ------------------------------------------------------------------ routing statistics
    def finish_stats(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``experts/<task>/layer<i>/usage`` → ``…/entropy`` (usage entropy / log E, 1 = uniform) and
        ``…/max_share`` (the largest expert's share of the task's assignments); other keys pass."""
        out = {}
        for k, v in means.items():
            if not (k.startswith("experts/") and k.endswith("/usage")):
                out[k] = v
                continue
            prefix = k[: -len("/usage")]
            share = v / v.sum().clamp_min(1e-12)
            n = share.numel()
            ent = -(share * share.clamp_min(1e-12).log()).sum()
            ent = ent / math.log(n) if n > 1 else ent.new_zeros(())
            out[f"{prefix}/entropy"] = ent.float()  # on the usage's device (logged with sync_dist)
            out[f"{prefix}/max_share"] = share.max().float()
        return out

    def routing_counts(self) -> dict[int, dict[str, torch.Tensor]]:
        """Block → task → token assignments per expert of every eval-mode forward since the model
        was built or :meth:`reset_routing_counts` (the eval routing report reads them)."""
        out = {}
        for i, moe in self.moe_layers().items():
            per_task = {
                t: moe.counts[self.route_key[t]] for t in self.tasks if self.route_key[t] in moe.counts
            }
            if per_task:
                out[i] = per_task
        return out

    def reset_routing_counts(self) -> None:
        """Clears the running counts of :meth:`routing_counts`."""
        for moe in self.moe_layers().values():
            moe.counts = {}
