"""Task-conditioned sparse mixture-of-experts MLP for ViT blocks, as in M³ViT.

Liang et al., "M³ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning
with Model-Accelerator Co-design", NeurIPS 2022; reference code: VITA-Group/M3ViT
(``models/custom_moe_layer.py``, ``models/gate_funs/noisy_gate_vmoe.py``,
``models/vision_transformer_moe.py``). The MLP of a transformer block becomes ``E`` expert MLPs
(hidden width = embedding width), and a task-conditioned router sends every token to ``k`` of
them. Gating and balancing follow Shazeer et al., "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, as the reference's v-MoE gate computes them:

* gates: a softmax over **all** ``E`` router logits, then the ``k`` largest kept **without
  renormalisation** (M³ViT's order; Shazeer keeps the top-k logits first). No noise by default:
  the paper's runs use the reference's v-MoE gate with noise std 0. With ``noisy_gating``
  (an option), training adds Shazeer's learned noise ``N(0, 1) · softplus(x W_noise)`` to the
  logits (no noise in eval mode).
* routers: one linear router per route key (``per_task``, the reference's "multi-gate", the
  paper's runs), or one router shared by all tasks (``task_embedding``) whose input is the token
  concatenated with a task code — the reference's task-conditioned gate: a one-hot task vector
  through an MLP (``T → D``, GELU, ``D → D``, LayerNorm; :class:`TaskCode`, one per backbone,
  shared by every MoE layer). ``task_embed="add"`` instead adds a learned per-task vector to the
  token (an option of this project).
* load balancing: ``cv²(importance) + cv²(load)`` with the **unbiased** sample variance (the
  reference's ``torch.var``), where importance is the sum over tokens of the gate values and load
  is the number of tokens routed to each expert (a count: only the importance term has a
  gradient), or, with noisy gating, Shazeer's smooth estimator
  ``Σ_x Φ((clean_i(x) − threshold_i(x)) / noise_std_i(x))`` (differentiable).
* dispatch: tokens are sorted by expert and each expert runs only on its own tokens
  (``index_select`` → expert MLP → gate-weighted ``index_add_``), so the expert FLOPs are
  ``k/E`` of evaluating every expert on every token. ``dispatch="dense"`` evaluates every expert
  and masks: the same result at full cost (a reference for tests and the benchmark).

Host syncs (the host waiting on the GPU, :mod:`mtl.host_syncs`): routing, the balancing loss
and the usage statistics stay on the device (counts by comparison, not ``torch.bincount``, which
reads the input's maximum on CUDA; the normal CDF by ``torch.special.ndtr``, not
``torch.distributions.Normal``, whose argument validation reads its inputs). The sparse dispatch
needs each expert's token count to split the tokens: with bf16 on a GPU with grouped GEMM
kernels (compute capability 9.x/10.x) and on the CPU it runs every expert in two
``torch.nn.functional.grouped_mm`` calls whose group offsets stay on the device (no sync);
otherwise (fp32 / fp16 on a GPU) it reads the counts once per MoE call (one sync per call).
``dispatch="dense"`` never syncs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn

ROUTERS = ("per_task", "task_embedding")
TASK_EMBEDS = ("concat", "add")
DISPATCH = ("sparse", "dense")


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``Var(x) / (mean(x)² + 1e-10)`` with the unbiased sample
    variance (``n − 1``, as the M³ViT reference's ``torch.var``); 0 when uniform or for one value."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(correction=1) / (x.mean() ** 2 + 1e-10)


def expert_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (``E``, int64, on ``index``'s device) of the expert indices ``index``.

    A comparison and a sum: no host sync (``torch.bincount`` reads ``index.max()`` on CUDA to size
    its output) and deterministic (no atomics).
    """
    experts = torch.arange(num_experts, device=index.device)
    return (index.reshape(-1, 1) == experts).sum(dim=0)


def grouped_gemm_without_sync(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs for ``dtype`` on ``device`` without reading its
    offsets on the host: bf16 on the CPU (no device to wait on) or on a GPU of compute capability
    9.x / 10.x (CUTLASS kernels); elsewhere it falls back to a loop over host-read offsets."""
    if dtype != torch.bfloat16 or not hasattr(F, "grouped_mm"):  # older torch releases: the split path
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a ``nn.Linear`` computes ``x`` in: autocast's when enabled on ``x``'s device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def smooth_load(
    clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Shazeer et al.'s differentiable load: expected tokens per expert under re-drawn noise.

    Args:
        clean: router logits without noise, ``N × E``.
        noisy: the logits the routing used, ``N × E``.
        noise_std: the noise scale, ``N × E`` (> 0).
        top_k: experts per token (< E).

    Returns:
        ``E`` values: ``Σ_x P(expert i in the top k of x)``.
    """
    top = noisy.topk(top_k + 1, dim=-1).values  # (N, k+1)
    in_top = noisy >= top[:, top_k - 1 : top_k]  # expert currently selected
    # selected: it stays in if its logit beats the (k+1)-th; otherwise it must beat the k-th
    threshold = torch.where(in_top, top[:, top_k : top_k + 1], top[:, top_k - 1 : top_k])
    # the standard normal CDF (torch.distributions.Normal validates its arguments: a host sync)
    return torch.special.ndtr((clean - threshold) / noise_std).sum(dim=0)


class TaskCode(nn.Module):
    """The reference's task code for a shared router: a one-hot task vector through an MLP.

    ``one_hot(task) → Linear(T, D) → GELU → Linear(D, D) → LayerNorm(D, eps 1e-6)``, the module
    the M³ViT reference builds once per backbone (``gate_task_represent``) and feeds to every MoE
    layer's gate, concatenated to each token. Linear weights start as the reference's ViT
    initialisation (truncated normal, std 0.02; zero biases).

    Args:
        keys: route keys, in one-hot order.
        dim: width ``D`` of the code (the reference's ``gate_task_specific_dim``).
    """

    def __init__(self, *, keys: Sequence[str], dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"task_embed_dim must be >= 1 for task_embed=concat, got {dim}")
        self.keys = list(keys)
        self.fc1 = nn.Linear(len(self.keys), dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for layer in (self.fc1, self.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, key: str) -> torch.Tensor:
        """The code of route key ``key``: a ``D`` vector (on the module's device)."""
        one_hot = torch.zeros(len(self.keys), device=self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        one_hot[self.keys.index(key)] = 1.0
        return self.norm(self.fc2(self.act(self.fc1(one_hot))))


class TaskRouter(nn.Module):
    """Router logits per route key: one linear router per key, or one shared router whose input
    carries the task (the token concatenated with a :class:`TaskCode`, or plus a learned vector).

    Args:
        dim: token width.
        num_experts: experts ``E``.
        keys: route keys (task names, or a group's first task when tasks share a router).
        mode: ``"per_task"`` or ``"task_embedding"``.
        noisy: learn a noise scale per token and expert (Shazeer's ``W_noise``).
        task_embed: with ``task_embedding``: ``"concat"`` (the reference: the gate reads
            ``[token, code]``, ``C + D`` inputs) or ``"add"`` (token + a learned per-key vector).
        task_embed_dim: width ``D`` of the concatenated code.
        same_init: ``per_task``: every key's router starts from the same weights (the reference
            copies its one pretrained gate into every task's gate); ``False`` draws each.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        keys: Sequence[str],
        mode: str,
        noisy: bool,
        task_embed: str = "concat",
        task_embed_dim: int = 64,
        same_init: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ROUTERS:
            raise ValueError(f"router={mode!r}; expected one of {ROUTERS}")
        if task_embed not in TASK_EMBEDS:
            raise ValueError(f"task_embed={task_embed!r}; expected one of {TASK_EMBEDS}")
        self.mode = mode
        self.concat = mode == "task_embedding" and task_embed == "concat"
        width = dim + (task_embed_dim if self.concat else 0)

        def linear(std: float) -> nn.Linear:
            layer = nn.Linear(width, num_experts, bias=False)
            nn.init.normal_(layer.weight, std=std) if std else nn.init.zeros_(layer.weight)
            return layer

        # router weights: small random (distinct experts per token at the start); noise weights: zero,
        # so the initial noise scale is softplus(0) ≈ 0.69 everywhere (Shazeer initialises both at 0)
        self.task_embed = None
        if mode == "per_task":
            gates = {k: linear(0.02) for k in keys}
            if same_init:
                first = gates[keys[0]].weight
                with torch.no_grad():
                    for layer in gates.values():
                        layer.weight.copy_(first)
            self.gate = nn.ModuleDict(gates)
            self.noise = nn.ModuleDict({k: linear(0.0) for k in keys}) if noisy else None
        else:
            self.gate = linear(0.02)
            if self.concat:  # the code's columns start at zero, as the reference pads its pretrained gate
                with torch.no_grad():
                    self.gate.weight[:, dim:] = 0.0
            else:
                self.task_embed = nn.ParameterDict({k: nn.Parameter(torch.randn(dim) * 0.02) for k in keys})
            self.noise = linear(0.0) if noisy else None

    def forward(
        self, tokens: torch.Tensor, key: str, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clean logits ``N × E`` and the noise scale ``N × E`` (``None`` without noisy gating), fp32.

        ``code``: the :class:`TaskCode` of ``key`` (``task_embed="concat"`` only).
        """
        if self.concat and code is None:
            raise ValueError(
                "router=task_embedding with task_embed=concat needs the task code (TaskCode(key)); "
                "M3ViT passes it to every MoE layer"
            )
        with torch.autocast(tokens.device.type, enabled=False):
            x = tokens.float()
            if self.mode == "per_task":
                gate, noise = self.gate[key], self.noise[key] if self.noise is not None else None
            else:
                gate, noise = self.gate, self.noise
                if self.concat:  # (N, C + D): the token and the task code
                    x = torch.cat([x, code.float().expand(x.shape[0], -1)], dim=-1)
                else:
                    x = x + self.task_embed[key].float()  # (N, C): the token plus the task embedding
            clean = F.linear(x, gate.weight.float())
            std = F.softplus(F.linear(x, noise.weight.float())) + 1e-2 if noise is not None else None
        return clean, std

    def key_parameters(self, key: str) -> Iterator[nn.Parameter]:
        """Parameters that only route key ``key`` uses (none for the shared concatenating router)."""
        if self.mode == "per_task":
            yield from self.gate[key].parameters()
            if self.noise is not None:
                yield from self.noise[key].parameters()
        elif self.task_embed is not None:
            yield self.task_embed[key]


class MoEMlp(nn.Module):
    """Sparse mixture-of-experts MLP with task-conditioned top-k routing (module docstring).

    Args:
        dim: token width ``C``.
        keys: route keys (see :class:`TaskRouter`).
        num_experts: experts ``E``.
        hidden: hidden width of every expert (M³ViT: ``C``).
        top_k: experts per token ``k``.
        router: ``"per_task"`` or ``"task_embedding"``.
        noisy_gating: Shazeer's learned noise on the router logits while training (an option; the
            reference's runs use none).
        task_embed, task_embed_dim, same_router_init: see :class:`TaskRouter` (``same_init``).
        dispatch: ``"sparse"`` (each expert on its tokens only) or ``"dense"`` (every expert on
            every token, masked; same result).
        act_layer: expert activation.
        drop: dropout inside the experts.
    """

    def __init__(
        self,
        *,
        dim: int,
        keys: Sequence[str],
        num_experts: int = 16,
        hidden: int | None = None,
        top_k: int = 4,
        router: str = "per_task",
        noisy_gating: bool = False,
        task_embed: str = "concat",
        task_embed_dim: int = 64,
        same_router_init: bool = True,
        dispatch: str = "sparse",
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"MoE needs num_experts >= 1 and 1 <= top_k <= num_experts; got {num_experts}, {top_k}"
            )
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch={dispatch!r}; expected one of {DISPATCH}")
        self.num_experts, self.top_k, self.dispatch = int(num_experts), int(top_k), dispatch
        self.hidden = int(hidden or dim)
        self.experts = nn.ModuleList(
            Mlp(dim, self.hidden, act_layer=act_layer, drop=drop) for _ in range(num_experts)
        )
        self.router = TaskRouter(
            dim=dim,
            num_experts=num_experts,
            keys=keys,
            mode=router,
            noisy=noisy_gating,
            task_embed=task_embed,
            task_embed_dim=task_embed_dim,
            same_init=same_router_init,
        )
        self.counts: dict[str, torch.Tensor] = {}  # eval-mode routing counts per key (plain tensors)

    def route(
        self, tokens: torch.Tensor, key: str, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Top-k gate values and expert indices (``N × k``) and the balancing loss (training).

        ``code``: the task code of ``key`` for the concatenating task-embedding router.
        """
        clean, std = self.router(tokens, key, code)
        noisy = self.training and std is not None
        logits = clean + torch.randn_like(clean) * std if noisy else clean
        probs = logits.softmax(dim=-1)  # over all experts, then top-k without renormalisation
        values, index = probs.topk(self.top_k, dim=-1)
        balance = None
        if self.training:
            importance = torch.zeros_like(probs).scatter(1, index, values).sum(dim=0)
            if noisy and self.top_k < self.num_experts:
                load = smooth_load(clean, logits, std, self.top_k)
            else:
                load = expert_counts(index, self.num_experts).float()
            balance = cv_squared(importance) + cv_squared(load)
        return values, index, balance

    def forward(
        self, x: torch.Tensor, *, key: str, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``B × N × C`` tokens routed with key ``key`` → (output, balance loss or ``None`` in eval)."""
        y, balance, _ = self.forward_with_usage(x, key=key, code=code)
        return y, balance

    def forward_with_usage(
        self, x: torch.Tensor, *, key: str, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`forward` plus, in eval mode, this call's token assignments per expert (``E``, fp32)."""
        b = x.shape[0]
        tokens = rearrange(x, "b n c -> (b n) c")
        values, index, balance = self.route(tokens, key, code)
        usage = None
        if not self.training:
            usage = expert_counts(index, self.num_experts).float()
            self.record(key, usage)
        mix = self._sparse if self.dispatch == "sparse" else self._dense
        return rearrange(mix(tokens, values, index), "(b n) c -> b n c", b=b), balance, usage

    def _sparse(self, tokens: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = index.reshape(-1)  # (N·k,) expert of every assignment
        order = flat.argsort(stable=True)
        source = order // self.top_k  # token of every assignment, grouped by expert
        gates = values.reshape(-1)[order].to(tokens.dtype)
        x = tokens.index_select(0, source)
        if self._grouped_ok(tokens):
            y = self._grouped_experts(x, flat[order], expert_counts(index, self.num_experts))
        else:  # the split sizes on the host: one sync per call on a GPU
            chunks = x.split(expert_counts(index, self.num_experts).tolist())
            # every expert runs (on 0 rows when idle): all parameters stay in the graph (DDP)
            y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks, strict=True)])
        return torch.zeros_like(tokens).index_add_(0, source, y * gates[:, None])

    def _grouped_ok(self, tokens: torch.Tensor) -> bool:
        """Grouped GEMM dispatch applies: sync-free here (:func:`grouped_gemm_without_sync`), plain
        timm expert MLPs (no hidden norm) and widths the kernels align (multiples of 8)."""
        first: Any = self.experts[0]
        return (
            grouped_gemm_without_sync(tokens.device, compute_dtype(tokens))
            and isinstance(first.norm, nn.Identity)
            and tokens.shape[-1] % 8 == 0
            and self.hidden % 8 == 0
        )

    def _grouped_experts(self, x: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert MLP on its rows of ``x`` (rows sorted by expert; ``expert``: each row's expert;
        ``counts``: rows per expert) as two grouped GEMMs: the group offsets stay on the device."""
        dtype = compute_dtype(x)
        offs = counts.cumsum(0).to(torch.int32)  # the end of every expert's rows
        first: Any = self.experts[0]

        def linear(name: str, inp: torch.Tensor) -> torch.Tensor:
            layers = [getattr(e, name) for e in self.experts]
            weight = torch.stack([layer.weight for layer in layers]).to(dtype)  # (E, out, in)
            out = F.grouped_mm(inp.to(dtype).contiguous(), weight.transpose(-2, -1), offs=offs)
            if layers[0].bias is not None:
                out = out + torch.stack([layer.bias for layer in layers]).to(dtype)[expert]
            return out

        h = first.drop1(first.act(linear("fc1", x)))
        return first.drop2(linear("fc2", h))

    def _dense(self, tokens: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        gates = torch.zeros(tokens.shape[0], self.num_experts, device=tokens.device, dtype=tokens.dtype)
        gates.scatter_(1, index, values.to(tokens.dtype))
        return sum(gates[:, e : e + 1] * expert(tokens) for e, expert in enumerate(self.experts))

    @torch.no_grad()
    def record(self, key: str, usage: torch.Tensor) -> None:
        """Adds eval-mode token assignments per expert to :attr:`counts` (for the routing report), on
        the device (no host sync; the report reads them once at the end)."""
        self.counts[key] = self.counts.get(key, 0) + usage.double()

    def upcycle(self, mlp: nn.Module) -> None:
        """Initialises the experts from a (pretrained) dense timm ``Mlp`` (sparse upcycling).

        Expert ``j`` copies hidden units ``[s·H, (s+1)·H)`` of the dense MLP, ``s = j mod (H_mlp / H)``
        (with ``H = H_mlp`` every expert is a full copy), and the dense output bias.
        """
        h_mlp = mlp.fc1.out_features
        if h_mlp % self.hidden:
            raise ValueError(
                f"expert_init=upcycle needs the MLP hidden width {h_mlp} to be a multiple of the expert "
                f"hidden width {self.hidden}; use expert_init=random or expert_hidden={h_mlp}"
            )
        slices = h_mlp // self.hidden
        with torch.no_grad():
            for j, expert in enumerate(self.experts):
                part = slice((j % slices) * self.hidden, (j % slices + 1) * self.hidden)
                expert.fc1.weight.copy_(mlp.fc1.weight[part])
                expert.fc2.weight.copy_(mlp.fc2.weight[:, part])
                if expert.fc1.bias is not None and mlp.fc1.bias is not None:
                    expert.fc1.bias.copy_(mlp.fc1.bias[part])
                if expert.fc2.bias is not None and mlp.fc2.bias is not None:
                    expert.fc2.bias.copy_(mlp.fc2.bias)

    def reset_random(self) -> None:
        """timm's ViT initialisation of every expert: truncated normal (std 0.02) weights, zero biases."""
        for expert in self.experts:
            for layer in (expert.fc1, expert.fc2):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
