"""Host syncs (the CPU waiting for the GPU) per training step, counted on the CPU with
:class:`mtl.host_syncs.HostSyncCounter`: the counter itself, the non-finite guard, M³ViT's MoE layer
and whole Lightning training steps (``benchmarks/host_syncs.py`` prints the table)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_M3VIT

from mtl.backbones.moe_mlp import MoEMlp
from mtl.guards import nonfinite_tasks
from mtl.host_syncs import HostSyncCounter, SyncsPerStep
from mtl.pipeline import train

STEPS = [
    "logger=none",
    "module.log_images=false",
    "+trainer.limit_val_batches=0",
    "trainer.max_epochs=1",
    "trainer.max_steps=6",
    "data.dataset.length=24",
    "+callbacks.host_syncs._target_=mtl.host_syncs.SyncsPerStep",
    "+callbacks.host_syncs.warmup=2",
    # last.ckpt's end-of-training save checks its tensors are finite (one read per save, not per step)
    "~callbacks.periodic_checkpoint",
]


# ------------------------------------------------------------------------------- the counter
def test_counter_counts_reads_of_device_tensors_only():
    w = torch.nn.Parameter(torch.randn(3))  # a device tensor (made with the module)
    with HostSyncCounter() as syncs:
        y = (w * 2).sum()
        y.item()  # 1
        host = y.detach().cpu()  # 2: a copy to the host
        host.item(), float(host), torch.tensor(3.0).item(), torch.zeros(2).tolist()  # host values: free
        bool((w > 0).all())  # 3
        w.tolist()  # 4
        torch.tensor(2.0, device=w.device)  # 5: host data copied to the device
        w[w > 0]  # 6: a boolean mask (the output's size is read on the host)
        torch.bincount(torch.tensor([0, 1]).to(w.device))  # 7: reads the input's maximum on CUDA
    assert syncs.count == 7, syncs.by_site
    assert syncs.by_op["_local_scalar_dense"] == 2 and syncs.by_op["tolist"] == 1
    assert syncs.by_op["cpu"] == 1 and syncs.by_op["tensor_to_device"] == 1


def test_guard_costs_one_sync_and_names_the_task():
    losses = {"depth": torch.tensor(1.0, requires_grad=True) * 2, "edge": torch.tensor(0.5) * 3}
    aux = torch.tensor(0.1) * 1
    for bad in (None, "edge"):
        if bad:
            losses[bad] = losses[bad] * float("nan")
        with HostSyncCounter() as syncs:
            names = nonfinite_tasks(losses, aux)
        assert names == ([bad] if bad else [])
        assert syncs.count == 1, syncs.by_site


# ------------------------------------------------------------------------------- M³ViT's MoE layer
def moe(**kw) -> MoEMlp:
    torch.manual_seed(0)
    return MoEMlp(dim=16, keys=["a", "b"], num_experts=4, top_k=2, hidden=16, **kw)


@pytest.mark.parametrize("noisy", [False, True])
def test_moe_routing_and_balance_loss_do_not_sync(noisy):
    """Routing, the balancing loss (counts and Shazeer's smooth load) and the dense dispatch read
    nothing on the host (``torch.bincount``: the input's maximum; ``torch.distributions.Normal``:
    argument validation)."""
    layer = moe(noisy_gating=noisy, dispatch="dense").train()
    x = torch.randn(2, 10, 16)
    with HostSyncCounter() as syncs:
        y, balance = layer(x, key="a")
        (y.square().mean() + balance).backward()
    assert syncs.count == 0, syncs.by_site


def test_moe_sparse_dispatch_syncs_once_per_call_in_fp32_and_never_in_bf16():
    """fp32: the split sizes are read once per MoE call; bf16: grouped GEMMs with the group offsets
    on the device, the same result as the split experts."""
    layer = moe().train()
    x = torch.randn(2, 10, 16)
    with HostSyncCounter() as syncs:
        for key in ("a", "b"):
            y, balance = layer(x, key=key)
            (y.square().mean() + balance).backward()
    assert syncs.count == 2 and syncs.by_op["tolist"] == 2, syncs.by_site

    assert layer._grouped_ok(x.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16), HostSyncCounter() as syncs:
        grouped, _ = layer(x, key="a")
        grouped.float().square().sum().backward()
    assert syncs.count == 0, syncs.by_site
    grad = layer.experts[1].fc1.weight.grad.clone()
    layer.zero_grad()
    layer._grouped_ok = lambda tokens: False  # the split experts under the same autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        split, _ = layer(x, key="a")
        split.float().square().sum().backward()
    torch.testing.assert_close(grouped, split, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad, layer.experts[1].fc1.weight.grad, atol=2e-2, rtol=2e-2)


def test_moe_eval_statistics_stay_on_the_device():
    """Eval-mode usage and the routing counts are device tensors (they are logged with
    ``sync_dist=True``, and NCCL reduces device tensors only): no copy to the host."""
    layer = moe(dispatch="dense").eval()
    with torch.no_grad(), HostSyncCounter() as syncs:
        _, _, usage = layer.forward_with_usage(torch.randn(2, 10, 16), key="a")
        assert not syncs.is_host(usage) and not syncs.is_host(layer.counts["a"])
    assert syncs.count == 0, syncs.by_site
    assert layer.counts["a"].sum() == 2 * 10 * 2


# ------------------------------------------------------------------------------- training steps
def syncs_per_step(objects) -> list[int]:
    (cb,) = [c for c in objects["trainer"].callbacks if isinstance(c, SyncsPerStep)]
    return cb.per_step[cb.warmup :]


@pytest.mark.parametrize(("check_grads", "guard_reads"), [(True, 2), (False, 1)])
def test_fixed_weights_training_step_syncs_only_for_the_guard(make_cfg, check_grads, guard_reads):
    """Only the non-finite guard reads the device in a step (the loss flags before the backward, the
    gradient norm before the optimiser step unless ``check_grads=false``): the progress bar's values
    are copied every ``log_every_n_steps`` steps (Lightning reads every ``prog_bar`` value after each
    batch)."""
    overrides = [*STEPS, "strategy=fixed", "trainer.log_every_n_steps=100"]
    _, objects = train(make_cfg(overrides + [f"module.nonfinite.check_grads={check_grads}"]))
    steps = syncs_per_step(objects)
    assert len(steps) >= 3 and max(steps) <= guard_reads, steps
    pbar = objects["trainer"].progress_bar_metrics
    assert {"semseg/loss", "depth/loss", "normals/loss", "edge/loss"} <= set(pbar)
    assert "train/depth/loss" in objects["trainer"].callback_metrics


def test_fixed_weights_logging_steps_sync_once_per_logged_value(make_cfg):
    """Every ``log_every_n_steps`` steps the loggers read the logged values (and the progress bar
    its losses in one copy); on average a few syncs per step at most."""
    _, objects = train(make_cfg([*STEPS, "strategy=fixed", "trainer.log_every_n_steps=2"]))
    steps = syncs_per_step(objects)
    assert min(steps) <= 2 and sum(steps) / len(steps) <= 7, steps  # 2: the guard's two reads


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_m3vit_training_step_syncs_only_for_the_split_sizes(make_cfg, precision):
    """M³ViT: fp32 reads each MoE call's split sizes (one sync per call); bf16 (grouped GEMM) none."""
    cfg = make_cfg(
        [*STEPS, "experiment=synthetic_m3vit", *TINY_M3VIT, "trainer.log_every_n_steps=100"]
        + [f"trainer.precision={precision}"]
    )
    _, objects = train(cfg)
    backbone = objects["module"].model.backbone
    calls = len(backbone.moe_blocks) * len(backbone.passes(backbone.tasks))
    steps = syncs_per_step(objects)
    expected = 2 + (calls if precision == "32" else 0)  # 2: the non-finite guard's loss flags and grad norm
    assert len(steps) >= 3 and max(steps) <= expected, (steps, calls)
