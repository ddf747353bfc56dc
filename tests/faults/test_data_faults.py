"""Wrongly encoded datasets (issue 21): the checker fails naming the files, and so does training.

Every case writes a small root in the exact on-disk format of the real NYUD-v2 / PASCAL-Context
tarballs (:mod:`mtl.data.fake`), injects one fault, and asserts that

* ``python -m mtl.data.check`` exits non-zero with a ``BAD`` line naming the file and the expectation;
* setting up the training data module (its preflight) raises, naming the file;
* with ``data.allow_bad_data=true`` the data module sets up and logs a warning naming the file.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data.base import BadSampleError, read_ids, require_root
from mtl.data.check import INVALID_SHARE_MAX, PREFLIGHT_SAMPLES, main, preflight
from mtl.data.datamodule import BadDataError, MTLDataModule
from mtl.data.fake import write_nyud, write_pascal
from mtl.data.nyud import SIZE, NYUDv2
from mtl.data.pascal_context import PASCALContext

PASCAL_SIZE = (24, 30)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Pristine roots, written once: NYUD-v2 at its real 448×576, PASCAL-Context small."""
    base = tmp_path_factory.mktemp("pristine")
    return {
        "nyud": write_nyud(base / "NYUDv2", n_train=3, n_val=1, size=SIZE),
        "pascal_context": write_pascal(base / "PASCALContext", n_train=3, n_val=1, size=PASCAL_SIZE),
    }


def _copy(roots: dict[str, Path], name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(roots[name], tmp_path / roots[name].name))


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _datamodule(name: str, root: Path, **kwargs) -> MTLDataModule:
    cls = NYUDv2 if name == "nyud" else PASCALContext
    size = SIZE if name == "nyud" else (32, 32)
    dataset_kwargs = kwargs.pop("dataset_kwargs", {})
    return MTLDataModule(
        dataset=functools.partial(cls, root=root, **dataset_kwargs),
        tasks=list(cls.TASKS),
        batch_size=1,
        input_size=size,
        pad_to=size,
        augment={},
        **kwargs,
    )


def _checker(name: str, root: Path, capsys) -> tuple[int, str]:
    rc = main([str(root), "--dataset", name, "--allow-partial"])
    return rc, capsys.readouterr().out


def _bad_line(out: str, path_part: str) -> str:
    return next((ln for ln in out.splitlines() if ln.startswith("BAD") and path_part in ln), "")


# ---- the faults: (dataset, fault writer, file named, reason expected) ----


def edge_01(root: Path) -> None:
    stored = np.asarray(Image.open(root / "edge" / "000001.png"))
    _png(root / "edge" / "000001.png", stored // 255)  # 0/1 instead of 0/255


def saliency_01(root: Path) -> None:
    for sid in read_ids(root / "ImageSets" / "Context" / "train.txt"):
        path = root / "sal_distill" / f"{sid}.png"
        _png(path, np.asarray(Image.open(path)) // 255)


def depth_millimetres(root: Path) -> None:
    path = root / "depth" / "000000.npy"
    np.save(path, np.load(path) * 1000.0)


def depth_negative(root: Path) -> None:
    path = root / "depth" / "000002.npy"
    depth = np.load(path)
    depth[:10] = -1.0
    np.save(path, depth)


def depth_all_missing(root: Path) -> None:
    np.save(root / "depth" / "000001.npy", np.zeros(SIZE, np.float32))


def nyud_normals_black(root: Path) -> None:
    for sid in ("000000", "000001", "000002"):
        _png(root / "normals" / f"{sid}.png", np.zeros((*SIZE, 3)))


def pascal_normals_black(root: Path) -> None:
    for sid in read_ids(root / "ImageSets" / "Context" / "train.txt"):
        _png(root / "normals_distill" / f"{sid}.png", np.zeros((*PASCAL_SIZE, 3)))


def nyud_duplicate_ids(root: Path) -> None:
    (root / "gt_sets" / "train.txt").write_text("000000\n000001\n000002\n000001\n")


def pascal_duplicate_ids(root: Path) -> None:
    path = root / "ImageSets" / "Context" / "train.txt"
    path.write_text(path.read_text() + "2008_000000\n")


def nyud_resized_copy(root: Path) -> None:
    """One sample resized (image and maps alike) to another size than the field's 448×576."""
    sid, h, w = "000002", 400, 512
    for folder in ("images", "segmentation", "normals", "edge"):
        path = root / folder / f"{sid}.png"
        with Image.open(path) as im:
            im.resize((w, h), Image.NEAREST).save(path)
    np.save(root / "depth" / f"{sid}.npy", np.ones((h, w), np.float32))


def nyud_map_size(root: Path) -> None:
    _png(root / "normals" / "000001.png", np.full((SIZE[0] // 2, SIZE[1] // 2, 3), 128))


def pascal_map_size(root: Path) -> None:
    _png(root / "sal_distill" / "2008_000001.png", np.zeros((PASCAL_SIZE[0] + 2, PASCAL_SIZE[1])))


def unresolved_id(root: Path) -> None:
    (root / "gt_sets" / "train.txt").write_text("000000\n000001\n000009\n000002\n")


FAULTS: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("nyud", edge_01, "edge/000001.png", "expected binary 0/255"),
    ("pascal_context", saliency_01, "sal_distill/2008_000000.png", "expected binary 0/255"),
    ("nyud", depth_millimetres, "depth/000000.npy", "millimetres"),
    ("nyud", depth_negative, "depth/000002.npy", "negative depth"),
    ("nyud", depth_all_missing, "depth/000001.npy", "every depth pixel is invalid"),
    ("nyud", nyud_normals_black, "normals/000000.png", "not unit length"),
    ("pascal_context", pascal_normals_black, "normals_distill/2008_000000.png", "not unit length"),
    ("nyud", nyud_duplicate_ids, "gt_sets/train.txt", "'000001' is listed 2 times (lines 2, 4)"),
    ("pascal_context", pascal_duplicate_ids, "Context/train.txt", "'2008_000000' is listed 2 times"),
    ("nyud", nyud_resized_copy, "images/000002.png", "size 400×512, expected 448×576"),
    ("nyud", nyud_map_size, "normals/000001.png", "differs from the image's"),
    ("pascal_context", pascal_map_size, "sal_distill/2008_000001.png", "differs from the image's"),
    ("nyud", unresolved_id, "images/000009.png", "file is missing"),
]


def test_good_roots_pass_the_checker_and_the_preflight(roots, capsys):
    for name, root in roots.items():
        rc, out = _checker(name, root, capsys)
        assert rc == 0 and "OK: no problems found" in out, out
        dm = _datamodule(name, root)
        dm.setup("fit")
        assert len(dm.train_set) == 3 and len(dm.val_set) == 1


@pytest.mark.parametrize(
    ("name", "fault", "path_part", "reason"), FAULTS, ids=[f[1].__name__ for f in FAULTS]
)
def test_checker_and_training_refuse_the_fault(
    roots, tmp_path, capsys, caplog, name, fault, path_part, reason
):
    root = _copy(roots, name, tmp_path)
    fault(root)
    rc, out = _checker(name, root, capsys)
    assert rc == 1 and "FAILED" in out, out
    assert reason in _bad_line(out, path_part), out

    with pytest.raises(BadDataError) as err:
        _datamodule(name, root).setup("fit")
    msg = str(err.value)
    assert path_part in msg and reason in msg, msg
    assert "data.allow_bad_data=true" in msg and "python -m mtl.data.check" in msg

    with caplog.at_level(logging.WARNING, logger="mtl.data.datamodule"):
        dm = _datamodule(name, root, allow_bad_data=True)
        dm.setup("fit")
    assert path_part in caplog.text and reason in caplog.text and "data.allow_bad_data=true" in caplog.text


def test_loader_refuses_unambiguous_encodings_naming_the_file(roots, tmp_path):
    """The per-sample checks on the loading path: beyond the preflight's sample, every file is checked."""
    nyud = _copy(roots, "nyud", tmp_path)
    edge_01(nyud)
    depth_millimetres(nyud)
    depth_negative(nyud)
    ds = NYUDv2(root=nyud, split="train")
    expected = {0: "depth/000000.npy", 1: "edge/000001.png", 2: "depth/000002.npy"}
    for index, path in expected.items():
        with pytest.raises(BadSampleError, match=path) as err:
            ds[index]
        assert f"train.txt line {index + 1}" in str(err.value)
    pascal = _copy(roots, "pascal_context", tmp_path)
    saliency_01(pascal)
    with pytest.raises(BadSampleError, match=r"sal_distill/2008_000000.png: binary map stored as 0/1"):
        PASCALContext(root=pascal, split="train", tasks=["saliency"])[0]


def test_black_normals_read_as_missing_are_a_task_without_supervision(roots, tmp_path):
    """With ``ignore_black_normals`` all-black normals decode to zero vectors: invalid everywhere."""
    nyud = _copy(roots, "nyud", tmp_path)
    nyud_normals_black(nyud)
    with pytest.raises(
        BadDataError, match=r"normals: 100.0% of the pixels .* are invalid, expected at most 50%"
    ):
        _datamodule("nyud", nyud, dataset_kwargs={"ignore_black_normals": True}).setup("fit")
    pascal = _copy(roots, "pascal_context", tmp_path)
    pascal_normals_black(pascal)
    ds = PASCALContext(root=pascal, split="train", ignore_black_normals=True)
    problems = [str(p) for p in preflight(ds)]
    assert any(
        "normals: 100.0% of the pixels" in p and "normals_distill/2008_000000.png" in p for p in problems
    )
    # the real PASCAL-Context normals are valid only on some classes: a high share is accepted
    assert INVALID_SHARE_MAX[("pascal_context", "normals")] >= 0.95


def test_skip_bad_samples_turns_loader_refusals_into_warnings(roots, tmp_path, caplog):
    root = _copy(roots, "nyud", tmp_path)
    edge_01(root)
    with caplog.at_level(logging.WARNING, logger="mtl.data.datamodule"):
        dm = _datamodule("nyud", root, skip_bad_samples=True)
        dm.setup("fit")
    assert "edge/000001.png" in caplog.text and "skipped" in caplog.text
    # a copy with every sample bad is refused even so: skipping would leave nothing
    root2 = _copy(roots, "pascal_context", tmp_path / "all")
    saliency_01(root2)
    with pytest.raises(BadDataError, match="sal_distill"):
        _datamodule("pascal_context", root2, skip_bad_samples=True).setup("fit")


def test_split_file_with_bom_crlf_and_blanks(roots, tmp_path, capsys):
    root = _copy(roots, "nyud", tmp_path)
    (root / "gt_sets" / "train.txt").write_bytes(b"\xef\xbb\xbf000000\r\n 000001 \r\n\r\n000002\t\r\n")
    assert NYUDv2(root=root, split="train").ids == ["000000", "000001", "000002"]
    rc, out = _checker("nyud", root, capsys)
    assert rc == 0, out
    dm = _datamodule("nyud", root)
    dm.setup("fit")
    assert [dm.train_set[i]["meta"]["id"] for i in range(3)] == ["000000", "000001", "000002"]


def test_an_id_that_does_not_resolve_names_the_split_file_and_line(roots, tmp_path, capsys):
    root = _copy(roots, "nyud", tmp_path)
    unresolved_id(root)
    rc, out = _checker("nyud", root, capsys)
    assert rc == 1 and "gt_sets/train.txt line 3" in _bad_line(out, "images/000009.png"), out
    with pytest.raises(
        BadDataError,
        match=r"images/000009.png: file is missing, as are the other 4.*'000009', .*train.txt line 3\)",
    ):
        _datamodule("nyud", root).setup("fit")
    with pytest.raises(
        BadSampleError, match=r"000009.png: file is missing \(id listed in .*train.txt line 3\)"
    ):
        NYUDv2(root=root, split="train")[2]


def test_require_root_names_the_key_the_path_and_how_to_get_the_data(tmp_path):
    missing = tmp_path / "nope" / "NYUDv2"
    for dataset in ("nyud", "mtl.data.nyud.NYUDv2", NYUDv2):
        with pytest.raises(FileNotFoundError) as err:
            require_root(dataset, missing)
        msg = str(err.value)
        assert "data.dataset.root" in msg and str(missing) in msg and "datasets/nyud/README.md" in msg
    with pytest.raises(FileNotFoundError, match="datasets/pascal_context/README.md"):
        require_root("pascal_context", None)
    assert require_root("mtl.data.synthetic.SyntheticScenes", None) is None
    assert require_root("nyud", tmp_path) == tmp_path


def test_preflight_is_bounded_and_synthetic_data_skips_it(roots, monkeypatch):
    import mtl.data.check as check

    calls = []
    real = check.check_sample
    monkeypatch.setattr(check, "check_sample", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    ids = [f"{i:06d}" for i in range(100)]
    ds = NYUDv2(root=roots["nyud"], split="train")
    ds.ids, ds.id_lines = ids, list(range(1, 101))
    ds.files = lambda sid: []  # no files to look up: only the sample's decoding is counted
    ds.ids[:3] = ["000000", "000001", "000002"]
    problems = preflight(ds)
    assert len(calls) == PREFLIGHT_SAMPLES and calls[0] == "000000"
    assert all(p.sample_id is not None for p in problems)  # the made-up ids are missing files, nothing else

    from mtl.data.synthetic import SyntheticScenes

    dm = MTLDataModule(dataset=functools.partial(SyntheticScenes, resolution=(32, 32), length=4),
                       tasks=["semseg"], batch_size=2)  # fmt: skip
    monkeypatch.setattr(check, "preflight", lambda *a, **k: pytest.fail("synthetic data is not preflighted"))
    dm.setup("fit")


def test_the_real_data_config_refuses_a_wrong_encoding_before_training(roots, tmp_path, make_cfg, caplog):
    """Through ``configs/data/pascal_context.yaml``: the preflight runs where ``train.py`` sets up data."""
    from mtl.pipeline import build_datamodule

    root = _copy(roots, "pascal_context", tmp_path)
    saliency_01(root)
    cfg = make_cfg(["data=pascal_context", f"paths.data_dir={tmp_path}", "data.input_size=[32,32]"])
    assert cfg.data.allow_bad_data is False
    with pytest.raises(BadDataError, match="sal_distill/2008_000000.png: binary map stored as 0/1"):
        build_datamodule(cfg).setup("fit")
    cfg = make_cfg(["data=pascal_context", f"paths.data_dir={tmp_path}", "data.input_size=[32,32]",
                    "data.allow_bad_data=true"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mtl.data.datamodule"):
        build_datamodule(cfg).setup("fit")
    assert "sal_distill/2008_000000.png" in caplog.text


def test_a_users_folder_dataset_gets_the_id_level_preflight_only(tmp_path):
    """A dataset the checker does not know (no ``path()``): duplicates and missing files are still
    found, the field's encoding checks are not applied to it."""
    from mtl.data.base import FolderDataset
    from mtl.data.check import preflight

    class Mine(FolderDataset):
        KEY = "mine"
        TASKS = ("semseg",)

        def split_file(self, split: str) -> Path:
            return self.root / f"{split}.txt"

        def files(self, sample_id: str) -> list[Path]:
            return [self.root / f"{sample_id}.png"]

        def load(self, sample_id: str) -> dict:
            raise AssertionError("the preflight of a user's dataset decodes nothing")

    (tmp_path / "train.txt").write_text("a\nb\na\n")
    (tmp_path / "a.png").write_bytes(b"")
    found = preflight(Mine(root=tmp_path, split="train"))
    assert any("listed 2 times" in p.reason for p in found)
    assert any(p.path.endswith("b.png") and p.reason == "file is missing" for p in found)
