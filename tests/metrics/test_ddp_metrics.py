"""Under DDP (2 CPU processes, gloo) every metric equals the single-process value on the same data:
states are summed across ranks, never averaged per rank."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtl.metrics import ConfusionMatrixMetric, DepthMetric, NormalsMetric, SaliencyMaxF, SEISMEdgeF

N, H, W = 4, 32, 40


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N):
        seg = torch.randint(0, 4, (1, H, W), generator=g)
        seg[:, : 2 + 3 * i] = 255  # different numbers of valid pixels per image
        depth = torch.rand(1, 1, H, W, generator=g) * 5
        depth[..., : 4 * i, :] = 0
        edge = torch.zeros(1, 1, H, W)
        edge[..., 8 + i : 24, 10 + 2 * i] = 1.0
        edge[..., 16, 10:30] = 1.0
        out.append(
            {
                "seg_pred": torch.randn(1, 4, H, W, generator=g),
                "seg": seg,
                "depth_pred": depth + torch.randn(1, 1, H, W, generator=g) * (0.2 + i),
                "depth": depth,
                "normals_pred": torch.randn(1, 3, H, W, generator=g),
                "normals": torch.nn.functional.normalize(torch.randn(1, 3, H, W, generator=g), dim=1),
                "sal_pred": torch.randn(1, 1, H, W, generator=g) * 3,
                "sal": (torch.rand(1, 1, H, W, generator=g) > 0.5 + 0.1 * i).float(),
                "edge_pred": edge * 8 - 4 + torch.randn(1, 1, H, W, generator=g),
                "edge": edge,
            }
        )
    return out


def _metrics(samples) -> dict[str, float]:
    ms = {
        "semseg": (ConfusionMatrixMetric(4), "seg_pred", "seg"),
        "depth": (DepthMetric(), "depth_pred", "depth"),
        "normals": (NormalsMetric(), "normals_pred", "normals"),
        "saliency": (SaliencyMaxF(), "sal_pred", "sal"),
        "edge": (SEISMEdgeF(max_dist=0.011, workers=0), "edge_pred", "edge"),
    }
    for s in samples:
        for m, p, t in ms.values():
            m.update(s[p], s[t])
    return {f"{task}/{k}": float(v) for task, (m, _, _) in ms.items() for k, v in m.compute().items()}


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _metrics(_data()[rank::world])  # rank r gets images r, r + world, …
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_metrics_equal_single_process(tmp_path):
    single = _metrics(_data())
    out = tmp_path / "ddp.json"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    assert set(ddp) == set(single)
    for k, v in single.items():
        assert math.isclose(ddp[k], v, rel_tol=1e-6, abs_tol=1e-6), (k, ddp[k], v)
    # per-rank averaging would differ: the ranks' own values are not the pooled one
    half = _metrics(_data()[0::2])
    assert any(not math.isclose(half[k], single[k], rel_tol=1e-3) for k in single)
