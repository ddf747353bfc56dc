"""A training loader that can stop and restart anywhere in an epoch and see the same batches.

Three pieces make the batch stream a pure function of ``(seed, epoch, position)``:

- :class:`ResumableSampler`: a ``DistributedSampler`` (so Lightning keeps it under DDP) whose
  order depends only on ``(seed, epoch)`` and which can skip the samples already consumed;
- :class:`SeededAugmentation`: every sample's random augmentation is drawn from a generator
  seeded by ``(seed, epoch, index)``, so it depends neither on the worker count nor on when
  the loader was (re)started;
- :class:`ResumableLoader`: a ``DataLoader`` with ``state_dict`` / ``load_state_dict``
  (Lightning's stateful-loader protocol), saved in every checkpoint: the epoch and the number of
  batches of it already trained on.

The loader draws its workers' base seed from its own generator, never from the global torch RNG,
so creating an iterator does not shift the random stream that dropout and the strategies use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded, per-epoch order of one rank's share of the dataset; can start mid-epoch.

    Args:
        dataset: the dataset.
        num_replicas: number of ranks (1 without DDP).
        rank: this rank.
        shuffle: shuffle every epoch (order fixed by ``seed`` and the epoch).
        seed: the order's seed.
        drop_last: drop the tail that does not divide evenly among the ranks (otherwise padded).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.skip = 0  # samples of this rank to skip at the start of the next iteration

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        for i in indices[skip:]:
            yield int(i), self.epoch


class SeededAugmentation(Dataset):
    """Wraps a dataset so each sample's random augmentation is seeded by ``(seed, epoch, index)``.

    Items are ``(index, epoch)`` pairs (as :class:`ResumableSampler` yields them); plain
    integer indices pass through unseeded. The global NumPy random state, which the joint
    transforms draw from, is set for the duration of one sample and restored afterwards.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # the wrapped dataset's attributes (TASKS, NUM_CLASSES, …)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, epoch = item
        words = np.random.SeedSequence([self.seed, epoch, index]).generate_state(4)
        state = np.random.get_state()
        np.random.seed(words)
        try:
            return self.dataset[index]
        finally:
            np.random.set_state(state)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that checkpoints its position.

    Args:
        *args, **kwargs: as ``DataLoader``; ``sampler`` must be a :class:`ResumableSampler`.
        progress: returns how many batches of the current epoch have been trained on (the
            Lightning trainer's batch progress), or -1 once the epoch is finished; without it
            the state is the epoch only.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        """The epoch, the number of its batches already trained on (per rank) and the number of ranks."""
        return {
            "epoch": int(self.sampler.epoch),
            "batches": int(self.progress()) if self.progress else 0,
            "world_size": int(self.sampler.num_replicas),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Positions the next iteration right after the last batch trained on before the save.

        A checkpoint written by another number of ranks resumes the interrupted epoch after the
        same number of batches per rank, with a warning: that epoch's samples are then not exactly
        the remaining ones (the following epochs are exact).
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        saved_world = int(state.get("world_size", self.sampler.num_replicas))
        if saved_world != self.sampler.num_replicas and 0 < batches < len(self) and self.sampler.rank == 0:
            warnings.warn(
                f"the checkpoint's loader position is {batches} batches per rank of {saved_world} ranks; "
                f"this run has {self.sampler.num_replicas}: the interrupted epoch {epoch} resumes after "
                f"{batches} batches per rank, so some of its samples are seen twice or not at all "
                "(the next epochs are exact)",
                stacklevel=2,
            )
        if batches < 0 or batches >= len(self):  # saved at an epoch's end: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * int(self.batch_size)


def private_generator(seed: int) -> torch.Generator:
    """A generator for a loader's worker seeds, so that iterating never touches the global RNG."""
    return torch.Generator().manual_seed(int(seed))
