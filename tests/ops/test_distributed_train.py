"""DDP training: gradient accumulation all-reduces once per optimiser step (``no_sync`` on the other
micro-batches) with the one-process result, every rank draws its own random numbers, and the
random states of a checkpoint restore on another number of ranks or GPUs."""

from __future__ import annotations

import random
import warnings

import dist_worker
import numpy as np
import pytest
import torch
from test_distributed_eval import run_ranks

from mtl.checkpoint import gather_rng_states, restore_rank_rng_state, rng_state, seed_rank_rng, set_rng_state


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _worst(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("strategy", ["ew", "upgrad"])
def test_accumulated_update_is_the_mean_of_the_micro_batch_updates(strategy):
    """With SGD, 2 accumulated micro-batches move the weights by the mean of their own updates
    (per-task gradient strategies write a reused flat buffer: the first micro-batch's gradient
    must survive the second's)."""
    import lightning as L
    from torch.utils.data import DataLoader, Subset

    data = dist_worker.FullyValid()

    def fit(indices: list[int], accumulate: int) -> dict[str, torch.Tensor]:
        module = dist_worker.build(strategy)
        module.accumulate = accumulate
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(module, train_dataloaders=DataLoader(Subset(data, indices), batch_size=2))
        return _params(module)

    init = _params(dist_worker.build(strategy))
    first, second = fit([0, 1], 1), fit([2, 3], 1)
    both = fit([0, 1, 2, 3], 2)
    expected = {k: (first[k] + second[k]) / 2 for k in init}  # init + mean of the two updates
    assert _worst(both, expected) < 1e-6
    assert _worst(both, second) > 1e-4  # not the last micro-batch's update alone


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ew", "upgrad"])
def test_ddp_accumulation_reduces_once_per_step_and_equals_one_process(tmp_path, strategy):
    """2 ranks × 4 micro-batches of 2, accumulated by 2: one gradient all-reduce per optimiser step
    for a one-backward strategy (none for a per-task-gradient one, which reduces by itself), and
    the weights of one process on the union of the ranks' batches."""
    run_ranks(["accumulate", str(tmp_path), strategy])
    ranks = [torch.load(tmp_path / f"{strategy}_rank{r}.pt") for r in range(2)]
    single = _params(dist_worker.fit(strategy, world=1))
    for r, out in enumerate(ranks):
        assert _worst(out["params"], single) < 1e-5, f"rank {r} differs from one process"
        calls = out["hook_calls"]
        buckets = len(set(calls))
        steps = dist_worker.MICRO // 2
        if strategy == "ew":  # DDP all-reduced the gradient buckets on the last micro-batch of each step
            assert buckets >= 1 and len(calls) == steps * buckets, calls
        else:
            assert calls == [], calls
    # every rank its own random stream (dropout, router noise), not a copy of rank 0's
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])


# ------------------------------------------------------------------------------- per-rank seeds
def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()


def _seed(seed: int) -> None:  # what seed_everything does to the three generators
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_each_rank_gets_its_own_reproducible_stream():
    _seed(42)
    seed_rank_rng(0)
    zero = _draws()
    _seed(42)
    assert _draws() == zero  # rank 0 keeps the one-process stream
    streams = []
    for rank in (1, 2, 1):
        _seed(42)
        seed_rank_rng(rank)
        streams.append(_draws())
    assert streams[0] == streams[2]  # reproducible
    for other in (zero, streams[1]):  # different per rank, in torch, NumPy and Python
        for a, b in zip(streams[0], other, strict=True):
            assert a != b
    _seed(43)
    seed_rank_rng(1)
    assert _draws()[0] != streams[0][0]  # another run seed, another stream


def test_module_seeds_its_rank_when_training_starts(monkeypatch):
    """A new run's rank 1 reseeds when training starts; a resumed one restores its saved state."""
    module = dist_worker.build("ew")
    monkeypatch.setattr(type(module), "global_rank", property(lambda self: 1))
    torch.manual_seed(42)
    module.on_train_start()
    after = torch.rand(3)
    torch.manual_seed(42)
    seed_rank_rng(1)
    assert torch.equal(after, torch.rand(3))
    torch.manual_seed(7)
    saved = [rng_state(), rng_state()]
    expected = torch.rand(3)
    torch.manual_seed(42)
    module._resume_rng = saved
    module.on_train_start()
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ resume on other hardware
def test_restore_on_fewer_ranks_restores_what_applies_and_warns():
    torch.manual_seed(1)
    states = [rng_state()]
    expected = [torch.rand(3)]
    torch.manual_seed(2)
    states.append(rng_state())
    expected.append(torch.rand(3))
    with pytest.warns(UserWarning, match="random states of 2 rank"):
        restore_rank_rng_state(states, rank=0, world_size=1)
    assert torch.equal(torch.rand(3), expected[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same world size: silent
        restore_rank_rng_state(states, rank=1, world_size=2)
    assert torch.equal(torch.rand(3), expected[1])


def test_restore_on_more_ranks_gives_the_new_ranks_fresh_streams():
    torch.manual_seed(1)
    states = [rng_state()]
    copy_of_zero = torch.rand(3)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="ranks 1-1 start fresh ones"):
        restore_rank_rng_state(states, rank=0, world_size=2)
    restore_rank_rng_state(states, rank=1, world_size=2)
    assert not torch.equal(torch.rand(3), copy_of_zero)  # not a copy of rank 0's stream


def test_restore_with_more_saved_cuda_states_than_devices(monkeypatch):
    """A checkpoint of a process that saw 4 GPUs restores on a node with 2: the first 2, a warning."""
    calls: list[int] = []

    def fake_set(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index >= 2:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        calls.append(index)

    state = {**rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", fake_set)  # what set_rng_state_all calls
    with pytest.warns(UserWarning, match="CUDA random states of 4 device"):
        set_rng_state(state)
    assert calls == [0, 1]


def test_gather_without_distributed_is_this_process():
    assert len(gather_rng_states()) == 1


def test_loader_position_of_another_world_size_resumes_and_warns(make_cfg):
    from mtl.pipeline import build_datamodule

    dm = build_datamodule(make_cfg([]))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.state_dict()["world_size"] == 1
    with pytest.warns(UserWarning, match=r"written by 2 rank\(s\), this run has 1"):
        loader.load_state_dict({"epoch": 1, "batches": 1, "world_size": 2})
    # the position is in samples (issue 21): one batch on each of 2 ranks = 2 batches' samples here
    assert loader.sampler.epoch == 1 and loader.sampler.skip == 2 * loader.batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.load_state_dict({"epoch": 1, "batches": 1})  # checkpoints before the world size was saved
