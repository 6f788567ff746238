"""Split a dataset's indices across data-parallel ranks.

`ShardedSampler` gives each rank its own slice of a dataset. In training mode it yields
exactly what `torch.utils.data.DistributedSampler` yields for the same arguments (a test
checks this), so runs stay comparable with plain DDP. It adds two things:

* an evaluation mode that neither pads nor drops, so a metric summed over all ranks counts
  every sample exactly once;
* a small amount of state (`state_dict`, `set_position`) so a run can resume mid-epoch.

Typical use, one sampler per rank::

    sampler = ShardedSampler(train_set, num_replicas=world, rank=rank, seed=seed)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # without this every epoch sees the same order
        for x, y in loader:
            ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler


def _resolve_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill in `num_replicas` / `rank` from the default process group when not given.

    Args:
        num_replicas: number of ranks, or None to ask `gradsync.comm`.
        rank: this process's rank, or None to ask `gradsync.comm`.

    Returns:
        `(num_replicas, rank)`.

    Raises:
        RuntimeError: from `gradsync.comm` when a value is missing and no process group
            is initialised.
    """
    if num_replicas is None or rank is None:
        # Imported here so that the data package (and its tests) never needs the
        # communication layer when the caller passes both values explicitly.
        from gradsync.comm import get_rank, get_world_size

        if num_replicas is None:
            num_replicas = get_world_size()
        if rank is None:
            rank = get_rank()
    return num_replicas, rank


class ShardedSampler(Sampler[int]):
    """Yield this rank's share of a dataset's indices.

    Training mode (the default) follows `DistributedSampler`: the index list is
    shuffled with a generator seeded by `seed + epoch`, then padded by repeating indices
    from its start (or cut at the tail with `drop_last`) to a multiple of `num_replicas`,
    and rank `r` takes `indices[r::num_replicas]`. Every rank therefore gets the same
    number of samples, which keeps collective calls in step.

    Evaluation mode (`eval_mode=True`) keeps the natural order and neither pads nor
    drops: rank `r` gets `range(r, n, num_replicas)`, so ranks may differ by one sample
    and the union over ranks is the dataset exactly once. `shuffle` is ignored there.

    Args:
        dataset: anything with `__len__`, or the length itself as an int.
        num_replicas: number of ranks; None reads the world size from `gradsync.comm`.
        rank: this rank; None reads it from `gradsync.comm`.
        shuffle: shuffle each epoch (training mode only).
        seed: base seed; must be the same on every rank.
        drop_last: cut the tail instead of padding (training mode only).
        eval_mode: evaluation sharding as described above.

    Raises:
        ValueError: if `num_replicas < 1`, `rank` is outside `[0, num_replicas)`, the
            length is negative, or `drop_last` is combined with `eval_mode`.
        RuntimeError: if a value must come from `gradsync.comm` and no process group
            is initialised.
    """

    def __init__(
        self,
        dataset: Sized | int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        eval_mode: bool = False,
    ) -> None:
        super().__init__()
        num_replicas, rank = _resolve_world(num_replicas, rank)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        length = dataset if isinstance(dataset, int) else len(dataset)
        if length < 0:
            raise ValueError(f"dataset length must be >= 0, got {length}")
        if eval_mode and drop_last:
            # Dropping samples would make the summed evaluation inexact, which is the
            # one thing eval mode promises.
            raise ValueError("drop_last=True cannot be combined with eval_mode=True")

        self.dataset = dataset
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.eval_mode = eval_mode
        self.epoch = 0
        # Samples of this rank's share to skip on the next iteration (see set_position).
        self.position = 0

        if eval_mode:
            # Ranks below n % R get one extra sample: ceil((n - r) / R).
            self.num_samples = max(0, -(-(length - rank) // num_replicas))
        elif drop_last:
            # Largest multiple of R that fits; same value as DistributedSampler's
            # ceil((n - R) / R) when R does not divide n.
            self.num_samples = length // num_replicas
        else:
            self.num_samples = -(-length // num_replicas)  # ceil(n / R)
        # Length of the padded or cut index list before it is split across ranks.
        self.total_size = self.num_samples * num_replicas

    def _epoch_indices(self) -> list[int]:
        """All indices of this epoch for this rank, before `position` is applied."""
        if self.eval_mode:
            return list(range(self.rank, self.length, self.num_replicas))
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.length, generator=generator).tolist()
        else:
            indices = list(range(self.length))
        if self.drop_last:
            indices = indices[: self.total_size]
        elif self.total_size > self.length:
            # Pad by cycling from the start; with fewer samples than ranks the list
            # may need to wrap several times (n = 3, R = 8 pads 5 from [a, b, c, a, b]).
            missing = self.total_size - self.length
            repeats = -(-missing // self.length)
            indices += (indices * repeats)[:missing]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._epoch_indices()
        start, self.position = self.position, 0
        return iter(indices[start:])

    def __len__(self) -> int:
        """Number of indices the next iteration yields (after any `set_position` skip)."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of `epoch`; call it on every rank before each epoch.

        Args:
            epoch: epoch number; the order is a function of `seed + epoch` only.
        """
        self.epoch = epoch

    def set_position(self, k: int) -> None:
        """Skip the first `k` samples of this rank's share on the next iteration.

        Used to resume mid-epoch: a trainer that had consumed `steps * batch_size`
        samples of epoch `e` on this rank calls `set_epoch(e)` and
        `set_position(steps * batch_size)`. The skip applies to the next `__iter__`
        only; that iteration resets it to 0, so later epochs start from the beginning.
        The sampler cannot count consumed samples itself because a `DataLoader`
        prefetches indices ahead of the training loop.

        Args:
            k: samples to skip, counted in this rank's share, `0 <= k <= len(self)`
                where `len` is taken without any pending skip.

        Raises:
            ValueError: if `k` is out of range.
        """
        if not 0 <= k <= self.num_samples:
            raise ValueError(f"position must be in [0, {self.num_samples}], got {k}")
        self.position = k

    def state_dict(self) -> dict[str, Any]:
        """Return `{"epoch", "seed", "position"}`; `position` is the pending skip.

        Returns:
            A plain dict that `load_state_dict` accepts.
        """
        return {"epoch": self.epoch, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `epoch` and `seed`, and `position` when present (default 0).

        Args:
            state: a dict from `state_dict`, possibly with `position` overwritten by
                the trainer's count of consumed samples.

        Raises:
            ValueError: if `position` is out of range.
        """
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.set_position(int(state.get("position", 0)))


class ElasticOrder:
    """One order of a dataset per epoch, cut into global batches that any number of workers
    share, for elastic training (the worker count may change between two steps).

    Epoch ``e`` is the permutation seeded by ``seed + e`` (as in `ShardedSampler`), consumed
    front to back: a step takes the next ``global_batch`` indices (fewer at the end of the
    epoch), and worker ``i`` of ``n`` takes ``chunk[i::n]``. With a fixed ``n`` that divides
    the batch this is exactly what `ShardedSampler` gives rank ``i`` step by step (its
    padding aside, at the epoch's end); when ``n`` changes, the rest of the epoch is simply
    cut differently, so every sample is seen once per epoch whatever the membership.

    Args:
        dataset: anything with `__len__`, or the length itself.
        seed: base seed, the same on every worker.
        shuffle: shuffle each epoch; False keeps the natural order.
    """

    def __init__(self, dataset: Sized | int, seed: int = 0, shuffle: bool = True) -> None:
        self.length = dataset if isinstance(dataset, int) else len(dataset)
        if self.length < 1:
            raise ValueError(f"dataset length must be >= 1, got {self.length}")
        self.seed, self.shuffle = seed, shuffle
        self._cached: tuple[int, list[int]] | None = None

    def epoch_indices(self, epoch: int) -> list[int]:
        """The whole order of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                generator = torch.Generator()
                generator.manual_seed(self.seed + epoch)
                order = torch.randperm(self.length, generator=generator).tolist()
            else:
                order = list(range(self.length))
            self._cached = (epoch, order)
        return self._cached[1]

    def batch(self, epoch: int, offset: int, global_batch: int, workers: int,
              index: int) -> tuple[list[int], int, float]:
        """Worker ``index``'s share of the step that starts ``offset`` samples into
        ``epoch``.

        Returns:
            ``(indices, taken, weight)``: this worker's indices, how many samples the whole
            step takes (the next offset is ``offset + taken``), and the factor for this
            worker's mean loss, ``workers * len(share) / taken``, so that the average over
            workers of the weighted gradients is the gradient of the step's mean loss even
            when the shares differ by one. A worker whose share is empty (a last chunk
            smaller than the worker count) gets one index with weight 0.

        Raises:
            ValueError: ``offset`` is not inside the epoch, or ``index`` not below
                ``workers``.
        """
        if not 0 <= offset < self.length:
            raise ValueError(f"offset must be in [0, {self.length - 1}], got {offset}")
        if not 0 <= index < workers:
            raise ValueError(f"index must be in [0, {workers - 1}], got {index}")
        chunk = self.epoch_indices(epoch)[offset:offset + global_batch]
        share = chunk[index::workers]
        if not share:
            return chunk[:1], len(chunk), 0.0
        return share, len(chunk), workers * len(share) / len(chunk)
