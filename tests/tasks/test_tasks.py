"""Task losses: ignore handling, defaults from the papers, and the task builder's errors."""

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


def test_normals_loss_sums_components_and_averages_over_valid_pixels():
    # the reference's L1Loss(normalize=True): Σ over valid pixels and the 3 components / #valid pixels
    tasks = build_tasks(["normals"])
    gt = torch.zeros(1, 3, 1, 3)
    gt[0, 2, 0, 0] = 1.0  # pixel 0: valid, +z
    gt[0, :, 0, 1] = 255.0  # pixel 1: the field's invalid encoding
    # pixel 2: the zero vector, this project's invalid encoding
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, 0, 0, 0] = 2.0  # normalised to +x: |1 − 0| + |0 − 0| + |0 − 1| = 2
    pred[0, 1, 0, 1] = 1.0
    pred[0, 1, 0, 2] = 1.0
    assert tasks["normals"].loss(pred, {"normals": gt}).item() == pytest.approx(2.0)


def test_normals_loss_normalises_as_f_normalize():
    # F.normalize divides by max(‖n‖, 1e-12): a prediction of norm 1e-8 still becomes a unit vector
    tasks = build_tasks(["normals"])
    gt = torch.zeros(1, 3, 1, 1)
    gt[0, 0] = 1.0
    pred = torch.zeros(1, 3, 1, 1)
    pred[0, 0] = 1e-8
    assert tasks["normals"].loss(pred, {"normals": gt}).item() == pytest.approx(0.0, abs=1e-6)
    pred[0, 0] = 1e-13  # below the floor: 1e-13 / 1e-12 = 0.1, loss |0.1 − 1| = 0.9
    assert tasks["normals"].loss(pred, {"normals": gt}).item() == pytest.approx(0.9, rel=1e-5)


def test_balanced_bce_is_the_references_bce_with_pos_weight_19_over_20():
    # edge: BCEWithLogits(pos_weight = 0.95 / 0.05 = 19), mean over valid pixels, divided by 20
    x = torch.tensor([[[[2.0, -1.0, 0.5]]]])
    t = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    sp = torch.nn.functional.softplus
    expected = (19 * sp(torch.tensor(-2.0)) + sp(torch.tensor(-1.0))) / 2 / 20
    assert balanced_bce(x, t, pos_weight=0.95).item() == pytest.approx(expected.item(), rel=1e-6)
    # saliency: 2-class CE with weights (1 − w, w), w = 1/2 negatives here, Σ / #valid (not / Σ weights)
    expected = (0.5 * sp(torch.tensor(-2.0)) + 0.5 * sp(torch.tensor(-1.0))) / 2
    assert balanced_bce(x, t).item() == pytest.approx(expected.item(), rel=1e-6)


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


def test_task_hooks_keep_the_published_tables_and_the_score():
    """The hooks that replaced report.MAIN_COLUMNS, objective.SCORE_METRICS and CLASSIFICATION."""
    tasks = build_tasks(list(TASKS), num_classes={"semseg": 3, "human_parts": 7})
    headline = {t: task.headline_metrics for t, task in tasks.items()}
    assert headline == {
        "semseg": ("miou",),
        "human_parts": ("miou",),
        "saliency": ("maxf",),
        "normals": ("mean",),
        "depth": ("rmse",),
        "edge": ("odsf", "f"),
    }
    score = {t: (task.score_metrics, task.score_factor) for t, task in tasks.items()}
    assert score == {
        "semseg": (("miou",), 1.0),
        "human_parts": (("miou",), 1.0),
        "saliency": (("maxf",), 1.0),
        "edge": (("odsf", "f"), 1.0),
        "depth": (("delta1",), 1.0),
        "normals": (("within_22_5",), 0.01),
    }
    assert {t for t, task in tasks.items() if task.needs_num_classes} == {"semseg", "human_parts"}
    assert {t: task.report_digits for t, task in tasks.items() if task.report_digits != 2} == {"depth": 4}
    refs = {t for t, task in tasks.items() if task.label_free_needs_reference}
    assert refs == {"depth", "normals"}


def test_score_uses_each_tasks_metric_and_factor():
    from mtl.objective import score

    tasks = build_tasks(["semseg", "normals", "edge"], num_classes={"semseg": 3})
    metrics = {
        "val/semseg/miou": 0.4,
        "val/normals/within_22_5": 60.0,
        "val/edge/f": 0.7,
        "val/edge/odsf": 0.5,
    }
    assert score(metrics, tasks) == pytest.approx((0.4 + 0.6 + 0.5) / 3)  # odsF preferred to F
    with pytest.raises(KeyError, match="val/normals/within_22_5"):
        score({"val/semseg/miou": 0.4, "val/edge/f": 0.7}, tasks)


def test_edge_metric_update_uses_the_label_map_only_for_seism():
    from mtl.metrics import SEISMEdgeF

    edge = build_tasks(["edge"])["edge"]
    calls = []

    class Spy(SEISMEdgeF):
        def update(self, logits, target, label_map=None):
            calls.append(label_map)

    pred, target = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    label_map = torch.ones(1, 4, 4, dtype=torch.int64)
    edge.update_metric(Spy(max_dist=0.011), pred, {"edge": target, "edge_labelmap": label_map})
    edge.update_metric(Spy(max_dist=0.011), pred, {"edge": target})
    assert calls[0] is label_map and calls[1] is None
    approx = edge.metric()
    edge.update_metric(approx, pred, {"edge": target, "edge_labelmap": label_map})  # the approximate F
    assert approx.update_called


def test_register_task_is_open_and_refuses_a_second_class_for_a_name():
    from mtl.tasks import Depth, register_task
    from mtl.tasks.registry import TASKS as REGISTRY

    class Fog(Depth):
        name = "fog"

    try:
        assert register_task(Fog) is Fog and build_tasks(["fog"])["fog"].name == "fog"
    finally:
        REGISTRY.pop("fog", None)

    class OtherDepth(Depth):
        pass

    with pytest.raises(ValueError, match="task name 'depth' is already registered by mtl.tasks.depth.Depth"):
        register_task(OtherDepth)
    with pytest.raises(TypeError, match="takes a Task subclass"):
        register_task(int)
