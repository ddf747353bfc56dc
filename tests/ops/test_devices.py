"""Device and dtype correctness of the tasks, metrics, decoders, heads, adapters, control and merging.

Every part runs with its data on a second device (``meta`` with values, :mod:`second_device`):
a tensor created on the host next to device data raises there as on a GPU, explicit copies and
host reads are recorded, and the numbers are compared with a CPU run of the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from second_device import DEVICE, DeviceMixError, SecondDevice
from torch import nn

from mtl.adapters.lora import LoRALinear
from mtl.adapters.mtlora import TaskLoRALinear
from mtl.decoders.hrnet import HRNetDecoder
from mtl.decoders.multihead import MultiHeadDecoder
from mtl.decoders.pup import PUPDecoder
from mtl.decoders.slimmable import SlimmableDecoder
from mtl.decoders.taskexpert import TaskExpertDecoder
from mtl.heads import TaskHeads
from mtl.merging.adamerging import AdaMerging
from mtl.merging.ties import TIESMerging
from mtl.metrics import ConfusionMatrixMetric, NormalsMetric, SEISMEdgeF
from mtl.tasks import build_tasks
from mtl.tasks.edge import LABEL_MAP_KEY
from mtl.tasks.losses import balanced_bce, masked_cross_entropy

NUM_CLASSES = {"semseg": 5, "human_parts": 7}
TASK_NAMES = ("semseg", "human_parts", "depth", "normals", "saliency", "edge")
B, H, W = 2, 20, 24


def batch_and_preds(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A batch of every task's targets (with ignored pixels) and raw predictions, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, NUM_CLASSES["semseg"], (B, H, W), generator=g)
    semseg[:, :3] = 255
    parts = torch.randint(0, NUM_CLASSES["human_parts"], (B, H, W), generator=g)
    parts[1] = torch.where(torch.rand(H, W, generator=g) < 0.5, 0, 255)  # an image without a person
    depth = torch.rand(B, 1, H, W, generator=g) * 5
    depth[..., :4] = 0.0  # missing
    normals = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
    normals[..., :2, :] = 0.0  # this project's invalid pixels
    normals[..., -2:, :] = 255.0  # the field's
    saliency = (torch.rand(B, 1, H, W, generator=g) > 0.6).float()
    saliency[..., -1] = 255.0
    labelmap = torch.randint(0, 3, (B, H // 4, W // 4), generator=g)
    labelmap = labelmap.repeat_interleave(4, 1).repeat_interleave(4, 2)
    edge = torch.zeros(B, 1, H, W)
    edge[:, 0, :, :-1] = (labelmap[:, :, 1:] != labelmap[:, :, :-1]).float()
    edge[..., -3:, :] = 255.0  # padding
    batch = {
        "semseg": semseg,
        "human_parts": parts,
        "depth": depth,
        "normals": normals,
        "saliency": saliency,
        "edge": edge,
        LABEL_MAP_KEY: labelmap,
    }
    preds = {
        "semseg": torch.randn(B, NUM_CLASSES["semseg"], H, W, generator=g),
        "human_parts": torch.randn(B, NUM_CLASSES["human_parts"], H, W, generator=g),
        "depth": torch.randn(B, 1, H, W, generator=g) + 2.0,
        "normals": torch.randn(B, 3, H, W, generator=g),
        "saliency": torch.randn(B, 1, H, W, generator=g),
        "edge": torch.randn(B, 1, H, W, generator=g) * 3,
    }
    return batch, preds


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or bool(torch.isnan(a).all() and torch.isnan(b).all())


# --------------------------------------------------------------------------- the tool itself
def test_second_device_rejects_a_host_tensor_next_to_device_data():
    with SecondDevice() as dev:
        hist = dev.put(torch.tensor([0, 2, 1, 3]))
        with pytest.raises(DeviceMixError, match="two devices"):
            torch.searchsorted(hist.cumsum(0), torch.tensor(3))  # the NormalsMetric bug
        with pytest.raises(DeviceMixError, match="two devices"):
            hist + torch.ones(4, dtype=torch.long)
        found = torch.searchsorted(hist.cumsum(0), torch.tensor(3, device=hist.device))
        host = hist.cpu()
        n = int(hist.sum())
    assert found.device.type == DEVICE and int(dev.get(found)) == 2
    assert host.device.type == "cpu" and host.tolist() == [0, 2, 1, 3] and n == 6
    assert dev.transfers == [
        f"aten._to_copy.default: cpu->{DEVICE}",
        f"aten._to_copy.default: {DEVICE}->cpu",
    ]
    assert dev.reads == ["aten._local_scalar_dense.default"]


# --------------------------------------------------------------------------- losses and metrics
@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_loss_and_metric_run_on_the_device_of_their_data(name):
    """Loss (forward and backward), metric update and compute with everything on the device:
    no operator meets a host tensor, every value stays on the device and equals the CPU run."""
    task = build_tasks([name], num_classes=NUM_CLASSES)[name]
    batch, preds = batch_and_preds()
    pred = preds[name].clone().requires_grad_()
    ref_loss = task.loss(pred, batch)
    ref_loss.backward()
    ref_metric = task.metric()
    task.update_metric(ref_metric, preds[name], batch)
    ref = ref_metric.compute()

    with SecondDevice() as dev:
        p = dev.put(pred)
        b = {k: dev.put(v) for k, v in batch.items()}
        loss = task.loss(p, b)
        loss.backward()
        metric = task.metric().to(DEVICE)
        task.update_metric(metric, dev.put(preds[name]), b)
        out = metric.compute()
    assert loss.device.type == DEVICE and loss.dtype == torch.float32
    assert torch.equal(dev.get(loss), ref_loss.detach())
    assert p.grad.device.type == DEVICE and torch.equal(dev.get(p.grad), pred.grad)
    assert set(out) == set(ref)
    for k, v in out.items():
        assert v.device.type == DEVICE, f"{name}/{k} computed on {v.device}"
        assert same(dev.get(v), ref[k]), f"{name}/{k}: {dev.get(v)} on the device, {ref[k]} on the CPU"
    assert not any("->cpu" in t for t in dev.transfers), dev.transfers  # nothing goes to the host


def test_metric_computes_read_nothing_on_the_host():
    """``compute`` of the training metrics reads no device value on the host (no sync at the end of
    every validation); the normals median was read through ``int()`` twice, mIoU-present by
    ``present.any()``."""
    batch, preds = batch_and_preds()
    tasks = build_tasks(list(TASK_NAMES), num_classes=NUM_CLASSES)
    with SecondDevice() as dev:
        b = {k: dev.put(v) for k, v in batch.items()}
        metrics = {t: task.metric().to(DEVICE) for t, task in tasks.items()}
        for t, task in tasks.items():
            task.update_metric(metrics[t], dev.put(preds[t]), b)
        dev.reads.clear()
        for metric in metrics.values():
            metric.compute()
    assert dev.reads == []


def test_normals_metric_without_valid_pixels_gives_nan_on_the_device():
    with SecondDevice() as dev:
        metric = NormalsMetric().to(DEVICE)
        metric.update(dev.put(torch.randn(1, 3, 4, 4)), dev.put(torch.zeros(1, 3, 4, 4)))
        out = metric.compute()
    assert all(v.device.type == DEVICE and math.isnan(dev.get(v)) for v in out.values())
    assert dev.reads == []


def test_human_parts_update_reads_only_the_label_check():
    """The images without a person are dropped on the device; the one host read left is the
    confusion matrix's check of the labels (it was three: ``any()``, ``max()``, ``min()``)."""
    batch, preds = batch_and_preds()
    task = build_tasks(["human_parts"], num_classes=NUM_CLASSES)["human_parts"]
    with SecondDevice() as dev:
        metric = task.metric().to(DEVICE)
        b = {k: dev.put(v) for k, v in batch.items()}
        p = dev.put(preds["human_parts"])
        dev.reads.clear()
        task.update_metric(metric, p, b)
    assert dev.reads == ["aten._local_scalar_dense.default"]


def test_confusion_matrix_still_names_a_bad_label():
    metric = ConfusionMatrixMetric(3)
    with pytest.raises(ValueError, match="label 7 outside"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]))


# --------------------------------------------------------------------------- SEISM (host work)
def test_seism_moves_each_input_to_the_host_once_and_returns_device_values():
    """SEISM's matching is host work: per batch the 8-bit prediction, the target and the label map
    cross once (not once per image); the scores come back on the states' device, equal to a CPU
    run."""
    batch, preds = batch_and_preds()
    task = build_tasks(["edge"])["edge"]
    ref_metric = task.eval_metric(max_dist=0.02, workers=0)
    task.update_metric(ref_metric, preds["edge"], batch)
    ref = ref_metric.compute()
    with SecondDevice() as dev:
        metric = task.eval_metric(max_dist=0.02, workers=0).to(DEVICE)
        assert isinstance(metric, SEISMEdgeF)
        b = {k: dev.put(v) for k, v in batch.items()}
        p = dev.put(preds["edge"])
        dev.transfers.clear()
        task.update_metric(metric, p, b)
        to_host = [t for t in dev.transfers if t.endswith("->cpu")]
        assert len(to_host) == 3, to_host  # prediction (uint8), target, label map
        dev.transfers.clear()
        out = metric.compute()
    assert sum(t.endswith("->cpu") for t in dev.transfers) == 2  # the pooled counts, once
    for k, v in out.items():
        assert v.device.type == DEVICE, f"edge/{k} on {v.device}"
        assert torch.equal(dev.get(v), ref[k]), k


# --------------------------------------------------------------------------- dtypes of the losses
def test_edge_loss_weight_is_exact_under_bf16():
    """The positive weight 0.95 is applied in float32: bf16 logits give the float32 loss of the same
    (bf16-representable) logits; in bf16 the weight was 0.94921875."""
    batch, preds = batch_and_preds()
    logits = preds["edge"].bfloat16()
    edge = build_tasks(["edge"])["edge"]
    loss = edge.loss(logits, batch)
    ref = edge.loss(logits.float(), batch)
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)
    target = batch["edge"]
    assert torch.equal(balanced_bce(logits, target, 0.95), balanced_bce(logits.float(), target, 0.95))
    wrong = balanced_bce(logits.float(), target, float(torch.tensor(0.95, dtype=torch.bfloat16)))
    assert not torch.equal(loss, wrong)


def test_cross_entropy_sums_in_float32_under_bf16():
    batch, preds = batch_and_preds()
    logits = preds["semseg"].bfloat16()
    loss = masked_cross_entropy(logits, batch["semseg"])
    assert loss.dtype == torch.float32
    assert torch.equal(loss, masked_cross_entropy(logits.float(), batch["semseg"]))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_loss_is_float32_for_bf16_predictions(name):
    task = build_tasks([name], num_classes=NUM_CLASSES)[name]
    batch, preds = batch_and_preds()
    loss = task.loss(preds[name].bfloat16(), batch)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, task.loss(preds[name].bfloat16().float(), batch))


# --------------------------------------------------------------------------- decoders and heads
FEATS = [(16, 8, 8), (24, 4, 4)]  # (channels, h, w) per level
DECODERS = {
    "multihead": lambda tasks: MultiHeadDecoder(in_channels=[16, 24], tasks=tasks, channels=8),
    "hrnet": lambda tasks: HRNetDecoder(in_channels=[16, 24], tasks=tasks, channels=[4, 4], expansion=2),
    "pup": lambda tasks: PUPDecoder(in_channels=[16, 24], tasks=tasks, channels=8, num_convs=2),
    "slimmable": lambda tasks: SlimmableDecoder(in_channels=[16, 24], tasks=tasks, channels=8),
    "taskexpert": lambda tasks: TaskExpertDecoder(
        in_channels=[16, 24], tasks=tasks, channels=8, num_experts=3, balance_weight=0.01, top_k=2,
        intermediate_supervision=True,
    ),
    "taskexpert_learned_ema": lambda tasks: TaskExpertDecoder(
        in_channels=[16, 24], tasks=tasks, channels=8, num_experts=2, memory_init="learned",
        memory_update="ema", gate_input="feature_memory",
    ),
    "taskexpert_zeros_nomemory": lambda tasks: TaskExpertDecoder(
        in_channels=[16, 24], tasks=tasks, channels=8, num_experts=2, memory_init="zeros",
    ),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_and_heads_run_on_the_device_and_dtype_of_the_features(name, training, dtype):
    tasks = ["semseg", "depth"]
    decoder = DECODERS[name](tasks).to(device=DEVICE, dtype=dtype).train(training)
    heads = TaskHeads(in_channels=decoder.out_channels, out_channels={"semseg": 5, "depth": 1})
    heads = heads.to(device=DEVICE, dtype=dtype)
    feats = [torch.randn(2, c, h, w, device=DEVICE, dtype=dtype) for c, h, w in FEATS]
    with SecondDevice():
        out = decoder(feats, tasks=tasks)
        preds = heads(out.features, (32, 32))
        tensors = [*out.features.values(), *preds.values(), *out.stats.values()]
        tensors += [f for level in out.intermediate for f in level.values()]
        tensors += [g for maps in out.maps.values() for g in maps]
        if out.aux_loss is not None:
            tensors.append(out.aux_loss)
            (out.aux_loss + sum(p.float().sum() for p in preds.values())).backward()
    assert all(t.device.type == DEVICE for t in tensors)
    assert all(p.dtype == dtype and p.shape[-2:] == (32, 32) for p in preds.values())
    if name.startswith("taskexpert") and not training:
        assert out.stats and out.maps


# --------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_parameters_follow_the_adapted_layer(dtype):
    base = nn.Linear(8, 6, device=DEVICE, dtype=dtype)
    lora = LoRALinear(base, rank=2)
    fork = TaskLoRALinear(nn.Linear(8, 6, device=DEVICE, dtype=dtype), tasks=["a", "b"], rank=2,
                          task_rank=1, scale=1.0, dropout=0.0)  # fmt: skip
    params = [lora.lora_A, lora.lora_B, *fork.parameters()]
    assert all(p.device.type == DEVICE and p.dtype == dtype for p in params)
    x = torch.randn(3, 8, device=DEVICE, dtype=dtype)
    with SecondDevice():
        y = lora(x)
        shared, per_task = fork.fork(x, None, ["a", "b"])
    assert y.device.type == DEVICE and shared.device.type == DEVICE
    assert all(v.device.type == DEVICE for v in per_task.values())


def test_lora_initialisation_does_not_depend_on_the_device():
    torch.manual_seed(0)
    cpu = LoRALinear(nn.Linear(8, 6), rank=2)
    torch.manual_seed(0)
    with SecondDevice() as dev:
        base = nn.Linear(8, 6)
        base.weight, base.bias = nn.Parameter(dev.put(base.weight)), nn.Parameter(dev.put(base.bias))
        moved = LoRALinear(base, rank=2)
    assert torch.equal(dev.get(moved.lora_A), cpu.lora_A.detach())


# --------------------------------------------------------------------------- merging
def test_ties_keeps_the_task_vectors_on_their_device():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    states = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    ref = TIESMerging(k=0.3)
    ref.prepare(base=base, states=states, keys=list(base))
    ref_out = {k: ref.merge_tensor(k, base[k], [s[k] for s in states]) for k in base}
    with SecondDevice() as dev:
        b = {k: dev.put(v) for k, v in base.items()}
        s = [{k: dev.put(v) for k, v in st.items()} for st in states]
        method = TIESMerging(k=0.3)
        method.prepare(base=b, states=s, keys=list(b))
        out = {k: method.merge_tensor(k, b[k], [st[k] for st in s]) for k in b}
    assert not any(t.endswith("->cpu") for t in dev.transfers), dev.transfers
    assert all(torch.equal(dev.get(out[k]), ref_out[k]) for k in base)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor, task_subset=None) -> dict[str, torch.Tensor]:
        return {"semseg": self.conv(x)}


class _Host:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tasks = build_tasks(["semseg"], num_classes={"semseg": 4})


def test_adamerging_learns_its_coefficients_on_the_device_of_the_images():
    g = torch.Generator().manual_seed(0)
    net = _TinyNet()
    base = {f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    images = torch.randn(4, 3, 5, 5, generator=g)
    keys = list(base)

    def run(put, model):
        method = AdaMerging(steps=3, batch_size=2, images=4, lr=0.1)
        context = {"module": _Host(model), "images": put(images), "tasks_of": [["semseg"], ["semseg"]],
                   "shared_keys": keys}  # fmt: skip
        b = {k: put(v) for k, v in base.items()}
        s = [{k: put(v) for k, v in st.items()} for st in states]
        return method, method.merge(base=b, states=s, keys=keys, context=context)

    ref_method, ref = run(lambda t: t, net)
    with SecondDevice() as dev:
        method, out = run(dev.put, _TinyNet().to(DEVICE))
    assert all(v.device.type == DEVICE for v in out.values())
    assert method.coefficients == ref_method.coefficients
    assert all(torch.equal(dev.get(out[k]), ref[k]) for k in keys)


# --------------------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_task_loss_and_metric_on_cuda_match_the_cpu():
    """The CPU-side checks above, on the real device: loss, training metric and (edge) SEISM."""
    batch, preds = batch_and_preds()
    cuda = {k: v.cuda() for k, v in batch.items()}
    for name in TASK_NAMES:
        task = build_tasks([name], num_classes=NUM_CLASSES)[name]
        metrics = [(task.metric(), task.metric().cuda())]
        if name == "edge":
            seism = {"max_dist": 0.02, "workers": 0}
            metrics.append((task.eval_metric(**seism), task.eval_metric(**seism).cuda()))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = task.loss(preds[name].cuda().bfloat16(), cuda)
        assert loss.dtype == torch.float32 and loss.is_cuda
        for host, device in metrics:
            task.update_metric(host, preds[name], batch)
            task.update_metric(device, preds[name].cuda(), cuda)
            ref, out = host.compute(), device.compute()
            for k, v in out.items():
                assert v.is_cuda, f"{name}/{k} on {v.device}"
                torch.testing.assert_close(v.cpu(), ref[k], rtol=1e-5, atol=1e-6, equal_nan=True)
