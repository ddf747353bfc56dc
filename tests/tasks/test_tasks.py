"""Task losses: ignore handling, defaults from REFERENCE.md, and the task builder's errors."""

import pytest
import torch

from mtl.tasks import TASKS, build_tasks
from mtl.tasks.losses import balanced_bce, masked_cross_entropy


def test_default_weights_are_the_fields():
    expected = {"semseg": 1, "human_parts": 2, "saliency": 5, "normals": 10, "depth": 1, "edge": 50}
    assert {n: c.default_weight for n, c in TASKS.items()} == expected


def test_all_ignored_maps_give_zero_loss_not_nan():
    logits = torch.randn(2, 7, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = masked_cross_entropy(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    b = balanced_bce(torch.randn(1, 1, 4, 4), torch.full((1, 1, 4, 4), 255.0))
    assert b.item() == 0.0


def test_balanced_bce_weights_positives():
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    zero = torch.zeros(1, 1, 1, 4)
    # logits 0: -log(0.5) per pixel; w = 0.95 on the positive, 0.05 on the 3 negatives
    expected = (0.95 + 3 * 0.05) * torch.log(torch.tensor(2.0)) / 4
    assert balanced_bce(zero, target, pos_weight=0.95).item() == pytest.approx(expected.item(), rel=1e-5)
    # automatic balancing: w = fraction of negatives = 0.75
    expected = (0.75 + 3 * 0.25) * torch.log(torch.tensor(2.0)) / 4
    assert balanced_bce(zero, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_normals_loss_uses_normalised_prediction_and_ignores_invalid():
    tasks = build_tasks(["normals"])
    gt = torch.zeros(1, 3, 1, 2)
    gt[0, 2, 0, 0] = 1.0  # valid +z; pixel 1 invalid
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, 2, 0, 0] = 7.0
    pred[0, 0, 0, 1] = 3.0
    assert tasks["normals"].loss(pred, {"normals": gt}).item() == pytest.approx(0.0, abs=1e-6)


def test_depth_loss_ignores_missing():
    tasks = build_tasks(["depth"])
    pred = torch.tensor([[[[1.0, 5.0]]]])
    gt = torch.tensor([[[[2.0, 0.0]]]])
    assert tasks["depth"].loss(pred, {"depth": gt}).item() == pytest.approx(1.0)


def test_build_tasks_errors_list_valid_choices():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sementic'\]; valid tasks: \['depth'"):
        build_tasks(["sementic"])
    with pytest.raises(ValueError, match="needs num_classes"):
        build_tasks(["semseg"])
    with pytest.raises(ValueError, match="duplicates"):
        build_tasks(["depth", "depth"])
    with pytest.raises(ValueError, match="not in the task list"):
        build_tasks(["depth"], options={"edge": {}})


def test_visualise_gives_side_by_side_rgb():
    tasks = build_tasks(["semseg", "depth", "normals", "edge"], num_classes={"semseg": 5})
    batch = {
        "semseg": torch.randint(0, 5, (2, 6, 8)),
        "depth": torch.rand(2, 1, 6, 8),
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 6, 8), dim=1),
        "edge": (torch.rand(2, 1, 6, 8) > 0.5).float(),
    }
    for name, task in tasks.items():
        pred = torch.randn(2, task.out_channels, 6, 8)
        img = task.visualise(pred, batch)
        assert img.shape == (6, 16, 3) and img.dtype.name == "uint8", name
