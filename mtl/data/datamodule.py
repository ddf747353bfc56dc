"""``MTLDataModule``: builds the train / val / evaluation datasets of any dataset class and their loaders.

Datasets are given as partial constructors (Hydra ``_partial_: true``) of a
:class:`~mtl.data.base.DenseDataset` subclass that accept ``split``, ``tasks`` and
``transform``; the class's declarations (``KEY``, ``TASKS``, ``NUM_CLASSES``, ``CLASS_NAMES``,
``EDGE_MAX_DIST``) are read without touching the disk.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from mtl.data.base import DenseDataset, FolderDataset, check_eval_split
from mtl.data.device_augment import prepare_batch
from mtl.data.resumable import ResumableLoader, ResumableSampler, SeededAugmentation, private_generator
from mtl.data.transforms import build_transform
from mtl.gpu import resolve_photometric_on_device

log = logging.getLogger(__name__)
MAX_LISTED = 20
"""Problems listed by name in a preflight error or warning (the checker lists them all)."""


class BadDataError(ValueError):
    """The preflight found wrongly encoded or missing data (:func:`mtl.data.check.preflight`)."""


def collate(samples: list[dict]) -> dict:
    """Stacks tensors; keeps ``meta`` as a list of per-sample dicts."""
    metas = [s.get("meta", {}) for s in samples]
    batch = default_collate([{k: v for k, v in s.items() if k != "meta"} for s in samples])
    batch["meta"] = metas
    return batch


def dataset_class(factory: Callable[..., Dataset] | type) -> type[DenseDataset]:
    """The :class:`DenseDataset` subclass a dataset constructor (a class or a partial of one) builds.

    Raises:
        TypeError: it is not a :class:`DenseDataset` subclass or declares no ``KEY``.
    """
    cls = factory.func if isinstance(factory, functools.partial) else factory
    if not (isinstance(cls, type) and issubclass(cls, DenseDataset)):
        raise TypeError(
            f"data.dataset: {cls!r} is not a mtl.data.base.DenseDataset subclass (a dataset class "
            "declares KEY, TASKS, NUM_CLASSES, CLASS_NAMES and EDGE_MAX_DIST)"
        )
    if not cls.KEY:
        raise TypeError(f"data.dataset: {cls.__qualname__} declares no KEY (e.g. 'nyud')")
    return cls


class EvalShardSampler(DistributedSampler):
    """Rank ``r`` of ``R`` reads samples ``r, r + R, r + 2R, …`` of a split, in order, without padding.

    ``DistributedSampler`` pads the split to a multiple of the ranks (NYUD-v2's 654 images become
    656 on 4 or 8 GPUs, two of them counted twice); here the ranks' shares differ by at most one
    sample and together hold every sample once. Evaluation only: no shuffling, and no rank may be
    left without a sample (DDP's first evaluation forward broadcasts buffers on every rank).

    Raises:
        ValueError: the split has fewer samples than there are ranks.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        if n < num_replicas:
            raise ValueError(
                f"the evaluation split has {n} sample(s), fewer than the {num_replicas} DDP ranks: every "
                "rank needs at least one (evaluate on fewer devices, e.g. trainer.devices=1)"
            )
        self.total_size = n
        self.num_samples = len(range(rank, n, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class MTLDataModule(L.LightningDataModule):
    """Train, validation and evaluation loaders over one dataset.

    Validation (which also picks ``best.ckpt``) reads ``val_split``; testing (``trainer.test``:
    ``eval.py``, ``train.py test=true``) reads ``eval_split``. The synthetic renderer has an
    independent ``test`` split; NYUD-v2 and PASCAL-Context have only ``train`` and ``val`` in the
    field's usage, and their published numbers are on ``val``.

    Args:
        dataset: partial constructor of a :class:`~mtl.data.base.DenseDataset` subclass
            accepting ``split``, ``tasks``, ``transform``.
        tasks: the experiment's task list (checked against what the dataset provides).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: loader worker processes.
        train_split: split name used for training.
        val_split: split name used for validation (the metrics that pick ``best.ckpt``).
        eval_split: split name the test loader serves (``eval.split``): one of the dataset's
            splits (:func:`mtl.data.base.check_eval_split`), ``val`` by default.
        augment: keyword arguments of :func:`mtl.data.transforms.build_transform` for the
            training pipeline (``hflip``, ``scale``, ``crop``, ``cat_max_ratio``,
            ``photometric``); default: horizontal flips only.
        pad_to: ``(h, w)`` every sample of every split is padded to (``None``: no padding).
        resize: ``(h, w)`` every sample of every split is first resized to (``None``: native size).
        skip_bad_samples: log and skip missing or corrupt samples instead of raising
            (on-disk datasets only; passed to the dataset constructor when set).
        allow_bad_data: log the preflight's findings as warnings (naming every file) instead of
            stopping. On-disk datasets are checked when a split is set up
            (:func:`mtl.data.check.preflight`: duplicate ids, missing files and header sizes over
            the whole split, decoding checks on 16 ids spread over it: 0/1 binary maps, depth in
            millimetres or negative, non-unit normals, tasks with too many invalid pixels). Files the
            loader cannot use still stop the run when read, unless ``skip_bad_samples`` skips them.
        pin_memory: pin host memory (useful on GPUs).
        input_size: ``(h, w)`` the network sees (backbone configs read it as ``data.input_size``).
        split_kwargs: per-split keyword overrides of the dataset constructor, keyed by split
            name (e.g. ``{"val": {"length": 200}, "test": {"length": 200}}`` for smaller synthetic
            validation and test sets).
        seed: seeds the training order (per epoch) and every sample's augmentation (per epoch
            and sample), so that the batch stream does not depend on the worker count and a
            resumed run sees exactly the batches an uninterrupted one would (``None``: random).
        cache: serve on-disk samples from the decoded-sample cache (:mod:`mtl.data.cache`), built
            at setup when missing or stale; the samples are byte-for-byte the decoded files.
        cache_dir: where the caches live (default ``<dataset root>/.mtl_cache``).
        fast_augment: the training augmentation in one pass
            (:class:`~mtl.data.fast_augment.FastTrainAugment`): the same draws and samples, less work.
        photometric_on_device: with ``fast_augment``, ship training samples packed for the device
            (:class:`~mtl.data.transforms.PackForDevice`: uint8 images with their drawn photometric
            parameters, 8-bit maps, packed normals); the module distorts, normalises and widens
            them on its device (:func:`mtl.data.device_augment.prepare_batch`). ``"auto"``: on when
            ``fast_augment`` is and a GPU is visible (the training pipeline resolves it from
            ``trainer.accelerator``, :func:`mtl.gpu.resolve_photometric_on_device`).

    Attributes:
        dataset_class: the dataset's class (its declarations: key, tasks, classes, edge tolerance).
        num_classes: the experiment's classification tasks → number of classes.
        class_names: the experiment's classification tasks → class names.
    """

    def __init__(
        self,
        *,
        dataset: Callable[..., Dataset],
        tasks: Sequence[str],
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        eval_split: str = "val",
        augment: Mapping | None = None,
        pad_to: Sequence[int] | None = None,
        resize: Sequence[int] | None = None,
        skip_bad_samples: bool = False,
        allow_bad_data: bool = False,
        pin_memory: bool = False,
        split_kwargs: Mapping[str, Mapping] | None = None,
        input_size: Sequence[int] | None = None,
        seed: int | None = 0,
        cache: bool = False,
        cache_dir: str | None = None,
        fast_augment: bool = False,
        photometric_on_device: bool | str = False,
    ) -> None:
        super().__init__()
        self.dataset_fn = dataset
        self.tasks = list(tasks)
        self.dataset_class = cls = dataset_class(dataset)
        provided = cls.TASKS
        missing = [t for t in self.tasks if t not in provided]
        if missing:
            raise ValueError(
                f"dataset {cls.__name__} does not provide task(s) {missing}; it provides {list(provided)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_classes = {t: n for t, n in cls.NUM_CLASSES.items() if t in self.tasks}
        self.class_names = {t: n for t, n in cls.CLASS_NAMES.items() if t in self.tasks}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_split, self.val_split = train_split, val_split
        self.eval_split = check_eval_split(cls, eval_split)
        self.augment = dict(augment) if augment is not None else {"hflip": 0.5}
        known = {"hflip", "scale", "crop", "cat_max_ratio", "photometric", "scale_normals"}
        unknown = set(self.augment) - known
        if unknown:
            raise ValueError(
                f"data.augment: unknown key(s) {sorted(unknown)}; expected hflip, scale, crop, "
                "cat_max_ratio, photometric, scale_normals"
            )
        self.pad_to = tuple(pad_to) if pad_to is not None else None
        self.resize = tuple(resize) if resize is not None else None
        self.input_size = tuple(input_size) if input_size is not None else None
        self.skip_bad_samples = skip_bad_samples
        self.allow_bad_data = allow_bad_data
        self.pin_memory = pin_memory
        self.split_kwargs = {k: dict(v) for k, v in (split_kwargs or {}).items()}
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.cache, self.cache_dir = bool(cache), cache_dir
        self.fast_augment = bool(fast_augment)
        self.photometric_on_device = resolve_photometric_on_device(
            photometric_on_device, fast_augment=self.fast_augment
        )
        if self.photometric_on_device and not self.fast_augment:
            raise ValueError("data.photometric_on_device=true needs data.fast_augment=true")
        self._train_loader: ResumableLoader | None = None
        self._pending_state: dict | None = None  # a checkpoint's loader position, for the next loader
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}  # split → its dataset with the evaluation transform

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            train_tf = build_transform(
                train=True,
                pad_to=self.pad_to,
                resize=self.resize,
                fast=self.fast_augment,
                photometric_on_device=self.photometric_on_device,
                **self.augment,
            )
            # the one-pass augmentation (first when nothing resizes before it) reads the cache in place
            views = self.fast_augment and self.resize is None
            train = self._make(self.train_split, train_tf, views=views)
            self.train_set = SeededAugmentation(train, seed=self.seed)
        self.val_set = self.eval_set(self.val_split)
        if stage in (None, "test"):
            self.eval_set(self.eval_split)  # built (and checked) now, not at the first test batch

    def eval_set(self, split: str) -> Dataset:
        """The dataset of ``split`` with the evaluation transform (built once, then kept)."""
        if split not in self.eval_sets:
            test_tf = build_transform(train=False, pad_to=self.pad_to, resize=self.resize)
            self.eval_sets[split] = self._make(split, test_tf)
        return self.eval_sets[split]

    def _make(self, split: str, transform: Callable[[dict], dict], *, views: bool = False) -> Dataset:
        kwargs = dict(self.split_kwargs.get(split, {}))
        if self.skip_bad_samples and issubclass(self.dataset_class, FolderDataset):
            kwargs["skip_bad_samples"] = True  # on-disk datasets only: rendered samples cannot be bad
        dataset = self.dataset_fn(split=split, tasks=self.tasks, transform=transform, **kwargs)
        if isinstance(dataset, FolderDataset):
            self._preflight(dataset)
            if self.cache:
                dataset.use_cache(self.cache_dir, views=views)
        elif self.cache:
            log.info("data.cache=true: %s is not read from disk, nothing to cache", type(dataset).__name__)
        return dataset

    def _preflight(self, dataset: FolderDataset) -> None:
        """Stops on what :func:`mtl.data.check.preflight` finds, or warns under ``allow_bad_data``.

        With ``skip_bad_samples`` the files the loader refuses (missing, undecodable, 0/1 maps,
        depth out of range, sizes that differ) are warnings (those samples are skipped) unless every
        checked sample is bad.

        Raises:
            BadDataError: naming the files, what was expected and what to do.
        """
        # imported here: a synthetic-data run never loads the on-disk datasets' dependencies
        from mtl.data.check import PREFLIGHT_SAMPLES, preflight, sample_indices

        problems = preflight(dataset, samples=PREFLIGHT_SAMPLES, input_size=self.input_size)
        if not problems:
            return
        fatal = problems
        if self.skip_bad_samples:
            fatal = [p for p in problems if not p.skippable]
            bad_ids = {p.sample_id for p in problems if p.skippable}
            checked = {dataset.ids[i] for i in sample_indices(dataset.ids, PREFLIGHT_SAMPLES)}
            if checked <= bad_ids:
                fatal = problems  # every checked sample bad: skipping would leave (next to) nothing
        name, split = type(dataset).__name__, dataset.split
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        if len(problems) > MAX_LISTED:
            listed += f"\n  … and {len(problems) - MAX_LISTED} more"
        check = f"python -m mtl.data.check {dataset.root} --dataset {dataset.KEY}"
        if fatal and not self.allow_bad_data:
            raise BadDataError(
                f"{name} {split} split at {dataset.root}: {len(problems)} problem(s) in the data (a run "
                f"would stop on them or train on wrong or empty targets):\n{listed}\nFix or re-download "
                f"those files (`{check}` lists every problem of the root), or set "
                "data.allow_bad_data=true to run anyway with these warnings."
            )
        reason = "data.allow_bad_data=true" if fatal else "data.skip_bad_samples=true: they are skipped"
        log.warning(
            "%s %s split at %s: %d problem(s) in the data (running anyway, %s):\n%s\nSee `%s`.",
            name, split, dataset.root, len(problems), reason, listed, check,
        )  # fmt: skip

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "collate_fn": collate,
            "generator": private_generator(self.seed),
        }

    def _progress(self) -> int:
        """Batches of the current epoch trained on (-1 once it is finished), for checkpoints."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return -1 if done >= trainer.num_training_batches else int(done)

    def train_dataloader(self) -> ResumableLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, seed=self.seed)
        loader = ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(sampler) >= self.batch_size,
            progress=self._progress,
            **self._loader_kwargs(),
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Distorts and normalises, on the batch's device, a batch shipped as uint8
        (``data.photometric_on_device``); float batches pass unchanged."""
        return prepare_batch(batch)

    def state_dict(self) -> dict:
        """The training loader's position (epoch, batches trained on), saved in every checkpoint."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Lightning restores this before the loaders are built: the next training loader resumes there."""
        if "train_loader" in state:
            self._pending_state = dict(state["train_loader"])

    def eval_dataloader(self, split: str | None = None, *, shard: bool = True) -> DataLoader:
        """A split in order, for validation and testing (``None``: the validation split).

        Under DDP (``shard`` and a trainer with more than one rank) each rank reads its share
        without padding (:class:`EvalShardSampler`): every image is evaluated exactly once,
        whatever the number of ranks, and the metrics' summed states give the one-process values.
        Lightning keeps this sampler (it is a ``DistributedSampler``) instead of padding the split.

        Args:
            split: the split to read: ``val_split`` when ``None`` (what validation, the control
                table and other choices made before testing read), :attr:`eval_split` for the
                test pass.
            shard: ``False``: every sample in this process (what one process reports on, e.g.
                ``eval.py``'s prediction pictures, or a table every rank must agree on).
        """
        split = self.val_split if split is None else check_eval_split(self.dataset_class, split)
        dataset = self.eval_set(split)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EvalShardSampler(dataset, num_replicas=world, rank=rank) if shard and world > 1 else None
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The evaluation split (:attr:`eval_split`, ``eval.split``)."""
        return self.eval_dataloader(self.eval_split)
