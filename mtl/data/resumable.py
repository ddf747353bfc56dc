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
        self._resumed: tuple[int, int, int] | None = None  # (epoch, trainer's batch count, samples) at resume

    def state_dict(self) -> dict[str, int]:
        """The epoch, the number of its batches already trained on (per rank, as the trainer counts
        them), the number of ranks, the batch size per rank, and the samples of the epoch already
        trained on over all ranks (-1 once the epoch is finished)."""
        batches = int(self.progress()) if self.progress else 0
        return {
            "epoch": int(self.sampler.epoch),
            "batches": batches,
            "world_size": int(self.sampler.num_replicas),
            "batch_size": int(self.batch_size),
            "samples": self._samples_done(batches),
        }

    def _samples_done(self, batches: int) -> int:
        if batches < 0:
            return -1
        per_batch = int(self.batch_size) * int(self.sampler.num_replicas)
        if self._resumed is not None and self._resumed[0] == self.sampler.epoch:
            _, batches0, samples0 = (
                self._resumed
            )  # the epoch resumed after samples0 samples, counted batches0
            return samples0 + (batches - batches0) * per_batch
        return batches * per_batch

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Positions the next iteration right after the last samples trained on before the save.

        The position is kept in samples, so a run resumed with another batch size (``data.batch_size``)
        continues the interrupted epoch with exactly the samples it had left, with a warning naming
        both sizes (the optimiser steps are of the new size from then on; a larger batch size also
        ends the interrupted epoch early, see the warning). A checkpoint written by another number of
        ranks resumes after the same number of samples, with a warning: that epoch's samples are then
        not exactly the remaining ones (the following epochs are exact).
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        world, rank, size = int(self.sampler.num_replicas), int(self.sampler.rank), int(self.batch_size)
        saved_world = int(state.get("world_size", world))
        saved_size = int(state.get("batch_size", size))  # older checkpoints: assumed unchanged
        samples = int(state.get("samples", -1 if batches < 0 else batches * saved_size * saved_world))
        total = len(self.sampler) * world
        self._resumed = None
        if samples < 0 or samples >= total or (batches >= len(self) and saved_size == size):
            # saved at an epoch's end: the next one starts afresh
            self.sampler.set_epoch(epoch + 1)
            self.sampler.skip = 0
            return
        skip = -(-samples // world)  # per rank; exact unless the number of ranks changed
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip
        self._resumed = (epoch, batches, samples)
        if rank != 0 or samples == 0:
            return
        if saved_world != world:
            warnings.warn(
                f"the checkpoint was written by {saved_world} rank(s), this run has {world}: the interrupted "
                f"epoch {epoch} resumes after its first {samples} samples ({skip} per rank); up to "
                f"{world - 1} of its samples are not seen (the next epochs are exact)",
                stacklevel=2,
            )
        if saved_size != size:
            left = (
                (len(self.sampler) - skip) // size
                if self.drop_last
                else -(-(len(self.sampler) - skip) // size)
            )
            cut = max(0, batches + left - len(self)) if batches < len(self) else 0
            warnings.warn(
                f"the checkpoint was written with batch size {saved_size} per rank (data.batch_size), this "
                f"run uses {size}: the interrupted epoch {epoch} continues after the {samples} samples "
                f"already trained on, in batches of {size}; optimiser steps are of the new size from now on "
                "(the learning-rate schedule, max_steps and every_n_steps count them)"
                + (
                    f"; the trainer counts that epoch's {batches} earlier batches against the new epoch "
                    f"length of {len(self)}, so it ends {cut} batch(es) early ({cut * size} samples of that "
                    "epoch unseen; the next epochs are complete)"
                    if cut
                    else ""
                ),
                stacklevel=2,
            )


def private_generator(seed: int) -> torch.Generator:
    """A generator for a loader's worker seeds, so that iterating never touches the global RNG."""
    return torch.Generator().manual_seed(int(seed))
