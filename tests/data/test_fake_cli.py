"""``python -m mtl.data.fake`` (issue 22, item 10): a command line that writes a fake real-format root."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from conftest import compose_cfg
from hydra.utils import instantiate

from mtl.data.check import check_root
from mtl.data.fake import MARKER, is_fake_root, main
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext


def test_module_has_a_command_line():
    out = subprocess.run([sys.executable, "-m", "mtl.data.fake", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: python -m mtl.data.fake" in out.stdout and "pascal_context" in out.stdout


def test_writes_a_nyud_root_and_prints_where_and_the_train_command(tmp_path, capsys):
    root = tmp_path / "data" / "NYUDv2"
    assert main(["nyud", str(root), "--train", "3", "--val", "2", "--size", "16", "20", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(root) in printed and "3 train / 2 val images of 16×20" in printed
    command = next(line for line in printed.splitlines() if line.startswith("train on it: "))
    assert command.endswith(f"python train.py data=nyud data.dataset.root={root} data.input_size=[16,20]")
    assert is_fake_root(root) and (root / MARKER).is_file()
    assert [len(NYUDv2(root=root, split=s)) for s in ("train", "val")] == [3, 2]
    # the printed command's overrides compose and build a data module whose preflight passes
    overrides = shlex.split(command.removeprefix("train on it: "))[2:]
    cfg = compose_cfg([*overrides, "data.num_workers=0", "data.pin_memory=false"], tmp_path / "run")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    assert dm.train_set[0]["image"].shape[-2:] == (16, 20)


def test_default_sizes_are_the_real_ones_and_the_root_passes_the_checker(tmp_path, capsys):
    root = tmp_path / "NYUDv2"
    assert main(["nyud", str(root), "--train", "1", "--val", "1"]) == 0
    printed = capsys.readouterr().out
    assert "448×576" in printed and "data.input_size" not in printed
    assert f"python -m mtl.data.check {root} --dataset nyud" in printed
    assert check_root(root, "nyud", allow_partial=True) == 0  # number of problems


def test_pascal_root_subprocess(tmp_path):
    root = tmp_path / "PASCALContext"
    cmd = [sys.executable, "-m", "mtl.data.fake", "pascal_context", str(root), "--train", "2", "--val", "1",
           "--size", "30", "40"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"python train.py data=pascal_context data.dataset.root={root}" in out.stdout
    assert "data.input_size" not in out.stdout  # 30×40 is padded to the config's 512×512
    assert [len(PASCALContext(root=root, split=s)) for s in ("train", "val")] == [2, 1]


def test_refuses_a_non_empty_folder_that_is_not_a_fake_root(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["nyud", str(folder), "--size", "8", "10"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "not empty" in err and "new or empty folder" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    file = tmp_path / "afile"
    file.write_text("x")
    assert main(["nyud", str(file)]) == 2


def test_rewrites_a_previous_fake_root_without_leftovers(tmp_path):
    root = tmp_path / "NYUDv2"
    assert main(["nyud", str(root), "--train", "4", "--val", "2", "--size", "8", "10"]) == 0
    assert main(["nyud", str(root), "--train", "1", "--val", "1", "--size", "8", "10"]) == 0
    assert len(list((root / "images").iterdir())) == 2
    assert main(["nyud", str(tmp_path / "empty_ok"), "--train", "1", "--val", "1", "--size", "8", "10"]) == 0


@pytest.mark.parametrize("args", [["--train", "0"], ["--size", "4", "4"]])
def test_bad_arguments_are_refused(tmp_path, args):
    with pytest.raises(SystemExit) as err:
        main(["nyud", str(tmp_path / "r"), *args])
    assert err.value.code == 2
