"""``hvd.elastic.ElasticSampler``: each epoch's order cut over whoever is a member now.

Horovod's contract: the script records the batches it has trained on
(``record_batch(batch_idx, batch_size)``); after a change of membership the indices that no
member has processed yet this epoch (the union over the members, as of the last commit) are
cut again over the new members, so no sample of an epoch is lost or seen twice (up to the
padding that makes the shares equal). The epoch's order is gradsync's ElasticOrder (the
permutation seeded by ``seed + epoch``).
"""

from __future__ import annotations

import math

import torch

from ..data.sampler import ElasticOrder
from .basics import is_initialized, rank, size


class ElasticSampler(torch.utils.data.Sampler):
    """Args:
        dataset: anything with ``__len__``.
        shuffle: shuffle each epoch (the same order on every member).
        seed: base seed.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0):
        self.order = ElasticOrder(len(dataset), seed, shuffle)
        self.epoch = 0
        self.processed: set[int] = set()
        self.indices: list[int] = []
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: nothing of it processed yet."""
        self.epoch, self.processed = epoch, set()
        self.reset()

    def get_indices(self, batch_idx: int, batch_size: int) -> list[int]:
        return self.indices[batch_idx * batch_size:(batch_idx + 1) * batch_size]

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Batch ``batch_idx`` of this member's share has been trained on."""
        self.record_indices(self.get_indices(batch_idx, batch_size))

    def record_indices(self, indices) -> None:
        self.processed.update(int(i) for i in indices)

    def reset(self) -> None:
        """Cut the epoch's unprocessed indices over the current members: member r takes
        every size-th from r, after the list is padded (from its start) to a multiple of
        the member count."""
        remaining = [i for i in self.order.epoch_indices(self.epoch) if i not in self.processed]
        n = size()
        total = math.ceil(len(remaining) / n) * n
        padded = remaining + remaining[:total - len(remaining)]
        self.indices = padded[rank():total:n]

    def sync(self) -> None:
        """Collective (hvd.elastic): take the newest epoch of any member and the union of the
        indices the members processed in it, then reset."""
        from .collectives import allgather

        mine = torch.tensor([self.epoch, *sorted(self.processed)], dtype=torch.int64)
        heads = allgather(torch.tensor([self.epoch, mine.numel()], dtype=torch.int64))
        everyone = allgather(mine)                 # (sum of lengths,)
        epochs, lengths = heads[0::2].tolist(), heads[1::2].tolist()
        newest, union, start = max(epochs), set(), 0
        for epoch, length in zip(epochs, lengths):
            if epoch == newest:
                union.update(everyone[start + 1:start + length].tolist())
            start += length
        self.epoch, self.processed = newest, union
        self.reset()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "processed_indices": sorted(self.processed)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.processed = state["epoch"], set(state["processed_indices"])
        if is_initialized():  # between two generations there is no world: sync() re-cuts
            self.reset()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
