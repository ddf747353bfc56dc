"""TaskExpert: the memory read at coarser taps (area, not point sampling) and the ablation options
(gate modes, MLoRE's low-rank experts and layer fusion)."""

import pytest
import torch
from test_taskexpert import TASKS, _decoder, _feats

from mtl.decoders.moe import BatchedExperts
from mtl.decoders.taskexpert import LayerFusion, _resize

PYRAMID = ([8, 12, 16, 24], [(8, 8), (4, 4), (2, 2), (1, 1)])  # a Swin-like pyramid at 32 px


def _randomise_gates(dec):
    with torch.no_grad():
        for branch in dec.per_task.values():
            for g in branch.gates:
                for p in g.parameters():
                    p.normal_(0, 1)


def test_downsampling_averages_every_pixel_upsampling_is_bilinear():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_resize(x, (1, 1)), x.mean(dim=(2, 3), keepdim=True))
    blocks = x.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # 4 × 4 blocks → 2 × 2
    torch.testing.assert_close(_resize(x, (2, 2)), blocks)
    small = torch.randn(2, 3, 2, 2)
    up = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(_resize(small, (8, 8)), up)
    assert _resize(x, (8, 8)) is x


def test_coarse_taps_read_the_whole_memory():
    """The 1 × 1 tap's memory read is the mean of all 64 memory pixels of the 8 × 8 tap: a change in
    one corner of the finest feature reaches the deepest layer's gates and, through its write, every
    pixel of the output. (Point-sampling bilinear resizing read only the centre 2 × 2 pixels.)"""
    channels, sizes = [8, 24], [(8, 8), (1, 1)]
    dec = _decoder(channels, gate_input="feature_memory").eval()
    _randomise_gates(dec)
    feats = _feats(channels, sizes)
    moved = [f.clone() for f in feats]
    moved[0][:, :, 0, 0] = torch.randn(2, channels[0])  # one corner pixel of the finest tap only
    a, b = dec(feats), dec(moved)
    for t in TASKS:
        deepest_a, deepest_b = a.maps[f"gates_{t}"][-1], b.maps[f"gates_{t}"][-1]  # (B, E, 1, 1)
        assert (deepest_a - deepest_b).abs().max() > 1e-4, t
        centre = (a.features[t] - b.features[t])[:, :, 4, 4]  # far from the corner's 3 × 3 reach
        assert centre.abs().max() > 1e-4, t


@pytest.mark.parametrize("mode", ["pixel", "image", "static"])
def test_gate_modes(mode):
    dec = _decoder([16, 16], gate_mode=mode).eval()
    _randomise_gates(dec)
    out = dec(_feats([16, 16], [(4, 5)] * 2, b=3))
    for layers in out.maps.values():
        for g in layers:  # (B, E, h, w), summing to 1 per pixel
            torch.testing.assert_close(g.sum(dim=1), torch.ones_like(g[:, 0]))
            over_pixels = (g - g[:, :, :1, :1]).abs().amax()
            over_samples = (g - g[:1]).abs().amax()
            if mode == "pixel":
                assert over_pixels > 1e-4
            else:
                assert over_pixels < 1e-6
                assert (over_samples > 1e-4) == (mode == "image")


def test_static_gates_read_no_input():
    with pytest.raises(ValueError, match="gate_input='feature_memory' with gate_mode='static'"):
        _decoder([16], gate_mode="static", gate_input="feature_memory")
    with pytest.raises(ValueError, match="gate_mode='global'"):
        _decoder([16], gate_mode="global")
    with pytest.raises(ValueError, match="fusion='sum'"):
        _decoder([16], fusion="sum")
    with pytest.raises(ValueError, match="expert_activation='relu'"):
        _decoder([16], expert_activation="relu")


def test_low_rank_experts_are_linear():
    torch.manual_seed(0)
    experts = BatchedExperts(in_channels=6, out_channels=5, num_experts=3, hidden=2, activation=False)
    x, y = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    zero = experts(torch.zeros_like(x))
    torch.testing.assert_close(experts(x + y) - zero, (experts(x) - zero) + (experts(y) - zero))
    mlp = BatchedExperts(in_channels=6, out_channels=5, num_experts=3, hidden=2)
    assert not torch.allclose(mlp(x + y) - mlp(x * 0), (mlp(x) - mlp(x * 0)) + (mlp(y) - mlp(x * 0)))
    assert experts.fc1.out_channels == 3 * 2  # rank 2 per expert


def test_layer_fusion_is_a_per_pixel_softmax_over_layers():
    torch.manual_seed(0)
    fusion = LayerFusion(channels=4, num_layers=3).eval()
    layers = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    with torch.no_grad():
        fusion.weights[-1].weight.zero_()
        fusion.weights[-1].bias.zero_()
        torch.testing.assert_close(fusion(layers), torch.stack(layers).mean(dim=0))
        fusion.weights[-1].bias.copy_(torch.tensor([-40.0, 40.0, -40.0]))
        torch.testing.assert_close(fusion(layers), layers[1])


def test_layer_softmax_fusion_picking_the_last_layer_equals_the_last_layer_output():
    """fusion=layer_softmax whose weights pick the deepest layer gives the decoder without memory (the
    last layer's assembled features, upsampled) exactly, on a pyramid."""
    channels, sizes = PYRAMID
    fused = _decoder(channels, use_memory=False, fusion="layer_softmax").eval()
    _randomise_gates(fused)
    last = _decoder(channels, use_memory=False).eval()
    missing, unexpected = last.load_state_dict(fused.state_dict(), strict=False)
    assert not missing and all(".fusion." in k for k in unexpected)
    with torch.no_grad():
        for branch in fused.per_task.values():
            branch.fusion.weights[-1].weight.zero_()
            branch.fusion.weights[-1].bias.copy_(torch.tensor([-40.0, -40.0, -40.0, 40.0]))
    feats = _feats(channels, sizes)
    a, b = fused(feats).features, last(feats).features
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t])


@pytest.mark.parametrize(
    "options",
    [
        {"gate_mode": "image", "gate_input": "feature_memory"},
        {"gate_mode": "static", "top_k": 2},
        {"fusion": "layer_softmax", "expert_activation": "none", "expert_hidden": 2, "expert_kernel": 3},
        {"fusion": "layer_softmax", "use_memory": False, "intermediate_supervision": True},
    ],
)
def test_every_parameter_learns_under_each_option(options):
    channels, sizes = PYRAMID
    dec = _decoder(channels, **options).train()
    out = dec(_feats(channels, sizes))
    loss = sum((v * torch.randn_like(v)).sum() for v in out.features.values())
    loss = loss + sum((v * torch.randn_like(v)).sum() for level in out.intermediate for v in level.values())
    loss.backward()
    dead = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def _ablations_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablations"] = module  # its dataclass resolves its module by name
    spec.loader.exec_module(module)
    return module


def test_ablation_rows_change_one_factor_and_compose(capsys):
    """benchmarks/ablations.py: every row is the default (or the multi-head baseline) with one decoder
    factor changed, composes with the table recipe, and the dry run prints one multirun per row over
    3 seeds into logs/ablations/<regime>/<row>; the pretrained regime adds pretrained=synthetic."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    ab = _ablations_script()
    names = [r.name for r in ab.ROWS]
    assert names[0] == "multihead" and len(set(names)) == len(names)
    with initialize_config_dir(str(ab.ROOT / "configs"), version_base=None):
        base = {
            e: OmegaConf.to_container(compose("train", [e]).model.decoder) for e in (ab.DEFAULT, ab.MULTIHEAD)
        }
        for row in ab.ROWS:
            cfg = compose("train", list(row.overrides))
            assert cfg.test and list(cfg.data.input_size) == [32, 32] and cfg.trainer.max_epochs == 8
            dec = OmegaConf.to_container(cfg.model.decoder)
            changed = {k for k in dec if dec[k] != base[row.overrides[0]][k]}
            expected = {o.split("=")[0].removeprefix("model.decoder.") for o in row.overrides[1:]}
            assert changed == expected, row.name
    assert ab.main(["taskexpert", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(lines) == len(ab.ROWS)
    scratch, pretrained = ab.default_baselines("scratch"), ab.default_baselines("pretrained")
    for line, row in zip(lines, ab.ROWS, strict=True):
        assert " ".join(row.overrides) + " seed=0,1,2 baselines=" + scratch in line
        assert f"hydra.sweep.dir={ab.OUT / 'scratch' / row.name}" in line and "pretrained=" not in line
        assert "+callbacks.throughput._target_=mtl.callbacks.Throughput" in line
        assert "model/backbone" not in line
    assert ab.main(["taskexpert", "--regime", "pretrained", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert lines[0].endswith("-m mtl.pretrain backbone=swin_mini resolution=32")  # reused when cached
    trains = [line for line in lines if " train.py " in line]
    assert all("pretrained=synthetic" in line and str(ab.OUT / "pretrained") in line for line in trains)
    assert all(f"baselines={pretrained}" in line for line in trains[-len(ab.ROWS) :])
    assert pretrained == "synthetic_nyud_swin_mini_32px_8ep_synthetic_pretrained"
    if not (ab.CONFIG_DIR / f"{pretrained}.yaml").is_file():  # made first
        assert "experiment=synthetic_single_task" in trains[0] and len(trains) == len(ab.ROWS) + 1


def test_ablation_rows_on_the_vit(capsys):
    """--backbone vit_mini --rows: the named rows only, on model/backbone=vit_mini (its own pretraining,
    baselines and folder logs/ablations/vit_mini-<regime>); an unknown row name is refused."""
    import pytest

    ab = _ablations_script()
    argv = ["taskexpert", "--regime", "pretrained", "--backbone", "vit_mini", "--rows", "default,multihead"]
    assert ab.main([*argv, "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert lines[0].endswith("-m mtl.pretrain backbone=vit_mini resolution=32")
    rows = [line for line in lines if "seed=0,1,2" in line]
    assert [line.split("hydra.sweep.dir=")[1] for line in rows] == [
        str(ab.OUT / "vit_mini-pretrained" / name) for name in ("multihead", "default")
    ]  # the table's order, not the command line's
    name = "synthetic_nyud_vit_mini_32px_8ep_synthetic_pretrained"
    assert ab.default_baselines("pretrained", "vit_mini") == name
    assert all("model/backbone=vit_mini" in line and f"baselines={name}" in line for line in rows)
    with pytest.raises(SystemExit, match="unknown rows \\['nope'\\]"):
        ab.main([*argv[:-1], "default,nope", "--dry-run"])


def test_ablation_step_times_run_the_rows():
    """--time: one timed training step (forward, losses, backward, AdamW) of the named rows."""
    ab = _ablations_script()
    rows = ab.select_rows("multihead,intermediate")
    times = ab.step_times(rows, steps=1, warmup=0)
    assert [name for name, _ in times] == ["multihead", "intermediate"]
    assert all(seconds > 0 for _, seconds in times)
