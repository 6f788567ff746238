"""Flat buffers that live in shared memory, all-reduced where they lie.

DataParallel copies every gradient into a bucket (dividing it by the world size on the way);
a shared-memory all-reduce of an ordinary bucket then copies it into the segment and the
result back out. When the bucket *is* this rank's slot of the segment, both copies go:

    buckets = SharedBuckets([(numel_0, float32), (numel_1, float32)], group)
    flat = buckets.buffer(0)             # (numel_0,) float32 in this rank's slot
    ...                                  # fill it (the gradient copy)
    buckets.all_reduce_async(0).wait()   # flat now holds the sum over the group

The ranks reduce a piece each and gather the others' pieces straight from their slots
(algorithms/shm.py, resident_all_reduce): for 2 ranks and S bytes, about 3 S of memory
traffic per rank instead of 5.5 S (copy in 2 S, reduce 1.5 S, copy out 2 S).

Every rank of the group must be on one host (the constructor raises ValueError otherwise,
the same on every rank) and call ``all_reduce_async`` for the same buffers in the same
order. A buffer must not be written between the start of its all-reduce and its wait.
"""

from __future__ import annotations

import torch

from .algorithms.shm import resident_all_reduce
from .algorithms.shm_segment import LINE, attach
from .collectives import _own, _prologue
from .group import Group, resolve
from .ops import ReduceOp, as_op, check_op_dtype, finish_, wire_op
from .p2p import P2P
from .work import Work

__all__ = ["SharedBuckets"]


class SharedBuckets:
    """Buffers of the given (numel, dtype) in one segment of the group's ranks.

    Args:
        layout: one (numel, dtype) per buffer.
        group: the ranks that share the buffers (default: the world); all on one host.
    Raises:
        ValueError: a rank of the group is on another host (or cannot map /dev/shm).
    """

    def __init__(self, layout: list[tuple[int, torch.dtype]], group: Group | None = None):
        self.group = resolve(group)
        self._p2p = P2P(self.group, "shared buckets")
        # Each buffer starts on a cache line, so that neighbours never share one.
        self._offsets, end = [], 0
        for numel, dtype in layout:
            self._offsets.append(end)
            end += -(-numel * dtype.itemsize // LINE) * LINE
        self._layout = list(layout)
        self._seg = attach(self._p2p, max(end, 1))

    def __len__(self) -> int:
        return len(self._layout)

    def buffer(self, b: int) -> torch.Tensor:
        """Buffer ``b``: (numel,) of its dtype in this rank's slot."""
        numel, dtype = self._layout[b]
        start = self._offsets[b]
        return self._seg.slot(self._p2p.rank, (start // dtype.itemsize) + numel,
                              dtype)[start // dtype.itemsize:]

    def all_reduce_async(self, b: int, op: ReduceOp | str = ReduceOp.SUM) -> Work:
        """Start the all-reduce of buffer ``b`` across the group, in place."""
        op = as_op(op)
        numel, dtype = self._layout[b]
        check_op_dtype(op, dtype)
        group, flat = self.group, self.buffer(b)
        _prologue(group, "all_reduce", flat, algorithm="shm", reduce_op=op.value)
        p2p = P2P(group, f"all_reduce(shm, shared bucket {b}) #{group.seq}{group.where()}")
        # A failed call leaves the segment's counters out of step: the buffers are not
        # usable afterwards (DataParallel stops the run on such an error anyway).

        def run():
            resident_all_reduce(self._seg, self._offsets[b], numel, dtype, wire_op(op), p2p)
            finish_(flat, op, group.size)
            return flat

        return _own(group, run, True)
