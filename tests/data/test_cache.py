"""The decoded-sample cache: byte-for-byte round trip, invalidation, concurrent builders, the switch."""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data.base import BadSampleError
from mtl.data.cache import CodedMap, SampleCache, fingerprint, main, open_cache, slot_name
from mtl.data.datamodule import MTLDataModule
from mtl.data.fake import write_nyud, write_pascal
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext


def assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "meta":
            assert a[key] == b[key]
            continue
        # arrays, tensors (the photometric draw) or coded normals (the device path's, decoded here)
        x, y = (v.decode() if isinstance(v, CodedMap) else np.asarray(v) for v in (a[key], b[key]))
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("roots")
    return {
        "nyud": write_nyud(tmp / "NYUDv2", n_train=3, n_val=2, size=(48, 64)),
        "pascal": write_pascal(tmp / "PASCALContext", n_train=3, n_val=2, size=(40, 56)),
    }


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize(("name", "cls"), [("nyud", NYUDv2), ("pascal", PASCALContext)])
def test_round_trip_equals_direct_decoding(roots, tmp_path, name, cls, split):
    ds = cls(root=roots[name], split=split)
    cache = open_cache(ds, tmp_path)
    for sid in ds.ids:
        assert_same_sample(ds.load(sid), cache.read(sid))
    # normals stored as packed 8-bit codes (a third of float32), depth / labels as decoded
    codecs = {k: v[0] for k, v in cache.index[ds.ids[0]]["arrays"].items()}
    assert codecs["normals"] == "normals_packed" and codecs["image"] == "raw"
    ds.use_cache(tmp_path)
    fresh = cls(root=roots[name], split=split)
    assert_same_sample(fresh[1], ds[1])


def test_black_normals_option_round_trips_and_is_part_of_the_fingerprint(roots, tmp_path):
    plain = NYUDv2(root=roots["nyud"], split="train")
    black = NYUDv2(root=roots["nyud"], split="train", ignore_black_normals=True)
    assert fingerprint(plain) != fingerprint(black)
    cache = open_cache(black, tmp_path)
    for sid in black.ids:
        assert_same_sample(black.load(sid), cache.read(sid))


def test_a_changed_file_rebuilds_the_cache(tmp_path, caplog):
    root = write_nyud(tmp_path / "NYUDv2", n_train=2, n_val=1, size=(32, 48))
    ds = NYUDv2(root=root, split="train")
    cache = open_cache(ds, tmp_path / "cache")
    before = cache.read(ds.ids[0])["image"]
    path = ds.path("image", ds.ids[0])
    Image.fromarray(255 - before).save(path)  # new content, new size or mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="mtl.data.cache"):
        rebuilt = open_cache(ds, tmp_path / "cache")
    assert "stale" in caplog.text and "rebuilding" in caplog.text
    assert rebuilt.folder == cache.folder
    assert np.array_equal(rebuilt.read(ds.ids[0])["image"], 255 - before)
    assert_same_sample(ds.load(ds.ids[1]), rebuilt.read(ds.ids[1]))
    # an unchanged root reuses it without rebuilding
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtl.data.cache"):
        open_cache(ds, tmp_path / "cache")
    assert "building" not in caplog.text and "rebuilding" not in caplog.text


def test_a_bad_sample_is_recorded_and_raised_or_skipped_as_without_the_cache(tmp_path):
    root = write_nyud(tmp_path / "NYUDv2", n_train=3, n_val=1, size=(32, 48))
    ds = NYUDv2(root=root, split="train", skip_bad_samples=True)
    ds.path("depth", ds.ids[1]).write_bytes(b"not a npy")
    ds.use_cache(tmp_path / "cache")
    with pytest.raises(BadSampleError, match="cannot read .npy"):
        ds.sample_cache.read(ds.ids[1])
    assert ds[1]["meta"]["id"] == ds.ids[2] and ds.skipped == [ds.ids[1]]


def _build(root: str, cache_dir: str, queue) -> None:
    ds = NYUDv2(root=root, split="train")
    cache = open_cache(ds, cache_dir)
    queue.put([cache.read(sid)["depth"].tobytes() for sid in ds.ids])


def test_concurrent_builders_do_not_corrupt_the_cache(tmp_path):
    root = write_nyud(tmp_path / "NYUDv2", n_train=6, n_val=1, size=(64, 80))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(str(root), str(tmp_path / "cache"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ds = NYUDv2(root=root, split="train")
    expected = [ds.load(sid)["depth"].tobytes() for sid in ds.ids]
    assert results[0] == expected and results[1] == expected
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert not leftovers  # no temporary or stale folder left behind
    assert (tmp_path / "cache" / slot_name(ds) / "manifest.json").is_file()


def test_the_cache_pickles_without_its_pages(roots, tmp_path):
    ds = NYUDv2(root=roots["nyud"], split="train")
    cache = open_cache(ds, tmp_path)
    cache.read(ds.ids[0])  # maps data.bin
    clone = pickle.loads(pickle.dumps(cache))
    assert isinstance(clone, SampleCache) and clone._data is None
    assert len(pickle.dumps(cache)) < 20_000
    assert_same_sample(clone.read(ds.ids[0]), ds.load(ds.ids[0]))


def test_an_unwritable_cache_dir_names_the_config_key(roots, tmp_path, monkeypatch):
    # a folder the process cannot create (simulated: root may write anywhere, chmod alone does not stop it)
    locked = tmp_path / "locked" / "cache"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match="data.cache_dir"):
        open_cache(NYUDv2(root=roots["nyud"], split="train"), locked)


def test_a_read_only_default_cache_folder_falls_back_to_decoding(roots, monkeypatch, caplog):
    # a shared dataset root that the user cannot write: the default cache folder fails, training goes
    # on decoding the files (one warning); an explicit data.cache_dir that fails stays an error
    import mtl.data.cache as cache_module

    def refuse(dataset, cache_dir=None, *, build=True):
        raise PermissionError("data.cache_dir: cannot write the sample cache under /shared/NYUDv2")

    monkeypatch.setattr(cache_module, "open_cache", refuse)
    ds = NYUDv2(root=roots["nyud"], split="train")
    with caplog.at_level(logging.WARNING):
        ds.use_cache(None)
    assert ds.sample_cache is None and "decoding NYUDv2/train from the files" in caplog.text
    assert_same_sample(ds[0], NYUDv2(root=roots["nyud"], split="train")[0])
    with pytest.raises(PermissionError, match="data.cache_dir"):
        ds.use_cache("/explicit/cache")


@pytest.mark.parametrize("fast", [False, True])
def test_datamodule_switch_serves_the_same_batches(roots, tmp_path, fast):
    def module(cache: bool) -> MTLDataModule:
        dm = MTLDataModule(
            dataset=functools.partial(NYUDv2, root=roots["nyud"]),
            tasks=list(NYUDv2.TASKS),
            batch_size=2,
            pad_to=(48, 64),
            cache=cache,
            cache_dir=str(tmp_path / "dm"),
            augment={"scale": (0.5, 2.0), "crop": (48, 64), "hflip": 0.5, "photometric": True},
            allow_bad_data=True,
            fast_augment=fast,
        )
        dm.setup("fit")
        return dm

    plain, cached = module(False), module(True)
    assert cached.train_set.dataset.sample_cache is not None
    assert cached.train_set.dataset.cache_views is fast  # the one-pass augmentation reads the pages in place
    assert plain.train_set.dataset.sample_cache is None
    for item in [(0, 0), (2, 1)]:
        a, b = plain.train_set[item], cached.train_set[item]
        for key in a:
            if key != "meta":
                assert a[key].equal(b[key]), key
    a, b = plain.val_set[1], cached.val_set[1]
    assert all(a[k].equal(b[k]) for k in a if k != "meta")


@pytest.mark.parametrize(("name", "cls"), [("nyud", NYUDv2), ("pascal", PASCALContext)])
def test_views_serve_the_same_samples_read_only_and_the_augmentation_never_hands_them_out(
    roots, tmp_path, name, cls
):
    from mtl.data.fast_augment import FastTrainAugment

    ds = cls(root=roots[name], split="train")
    cache = open_cache(ds, tmp_path)
    augment = FastTrainAugment(scale=(0.5, 2.0), crop=(40, 48), hflip=0.5, photometric="device")
    still = FastTrainAugment(crop=None, hflip=0.0, photometric=None)  # no scale, no crop: the input's pixels
    for sid in ds.ids:
        copied, viewed = cache.read(sid), cache.read(sid, views=True)
        assert viewed.keys() == copied.keys()
        coded = [k for k, v in viewed.items() if isinstance(v, CodedMap)]
        assert coded == (["normals"] if "normals" in copied else [])
        for key, value in viewed.items():
            if key == "meta":
                continue
            array = value.code if isinstance(value, CodedMap) else value
            assert not array.flags.writeable, key
            decoded = value.decode() if isinstance(value, CodedMap) else value
            assert decoded.dtype == copied[key].dtype and decoded.tobytes() == copied[key].tobytes(), key
        for seed in range(6):
            np.random.seed(seed)
            a = augment(copied)
            np.random.seed(seed)
            b = augment(viewed)
            assert_same_sample(a, b)
        out = still(viewed)
        assert_same_sample(out, still(copied))
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                assert value.flags.writeable and not np.shares_memory(value, cache._map()), key


def test_label_counts_equal_bincount():
    from mtl.data.fast_augment import label_counts

    rng = np.random.default_rng(0)
    for labels in (
        rng.integers(0, 256, (37, 53), dtype=np.uint8),
        np.full((5, 7), 255, np.uint8),
        rng.integers(0, 400, (9, 11)).astype(np.int16),
        rng.integers(0, 256, (64, 80), dtype=np.uint8)[::2, 1::3],  # a strided view
    ):
        assert np.array_equal(label_counts(labels), np.bincount(labels.ravel(), minlength=256))
        assert label_counts(labels).dtype == np.int64


def test_command_line_builds_every_split(roots, tmp_path, capsys):
    main(["--dataset", "nyud", "--root", str(roots["nyud"]), "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    for split in ("train", "val"):
        ds = NYUDv2(root=roots["nyud"], split=split)
        open_cache(ds, tmp_path, build=False)  # valid: no rebuild needed


def test_window_gather_is_c_contiguous():
    """The one-pass gathers hand out C-contiguous windows (OpenCV's histogram of the window check
    and ToTensor are several times slower on a column-major array)."""
    import numpy as np

    from mtl.data.fast_augment import gather, nearest_index

    seg = np.arange(375 * 500, dtype=np.uint32).reshape(375, 500).astype(np.uint8)
    rows, cols = nearest_index(375, 562)[:300], nearest_index(500, 750)[100:400]
    for value in (seg, seg.astype(np.float32), np.dstack([seg] * 3)):
        out = gather(value, rows, cols)
        assert out.flags["C_CONTIGUOUS"] and np.array_equal(out, value[rows][:, cols])
