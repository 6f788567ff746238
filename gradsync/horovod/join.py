"""``hvd.join()`` for uneven data, and ``hvd.barrier()``.

Horovod's contract: a rank that runs out of batches calls ``join()``; until every rank has
joined, the all-reduces its peers still start (``hvd.allreduce`` and DistributedOptimizer's
gradients) go on with the joined ranks contributing zeros, and ``join()`` returns the rank
that joined last. gradsync's collectives are matched by order, so the ranks need to know
what a joined rank must stand in for: before each operation on the global process set every
rank contributes a header to one small all-reduce (int64, (5,)):

    [joined?, kind, a, b, c]   summed over the ranks; an active rank puts its operation's
                               description (a, b, c), a joined rank zeros, so a joined rank
                               reads the description as the sum divided by the active count

A rank that has not joined launches its operation right after the header without waiting
for it (the two overlap; a joined rank launches the same operation once it has read the
header), except for operations a joined rank cannot stand in for (broadcast, allgather, ...):
those wait and raise one ValueError on every active rank while a rank has joined. Operations
on a ProcessSet other than the global one are not covered (they negotiate nothing).
"""

from __future__ import annotations

import time
import weakref

import torch

from .. import comm
from . import trace
from .basics import global_process_set

ALLREDUCE, OPTIMIZER, OTHER = 1, 2, 3  # header kinds
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8)
OPS = tuple(comm.ReduceOp)
# Horovod's context is per process: the optimizers (by creation order, the same on every
# rank) and how many operations this rank has negotiated since the last join.
_OPTIMIZERS: list = []
_COUNT = [0]


def register_optimizer(optimizer) -> int:
    """A DistributedOptimizer's index, for a joined rank to stand in for its buckets."""
    _OPTIMIZERS.append(weakref.ref(optimizer))
    return len(_OPTIMIZERS) - 1


def _header(group: comm.Group, kind: int, a: int = 0, b: int = 0, c: int = 0,
            joined: bool = False) -> tuple[torch.Tensor, comm.Work]:
    h = torch.tensor([1, 0, 0, 0, 0] if joined else [0, kind, a, b, c], dtype=torch.int64)
    return h, comm.all_reduce_async(h, op=comm.ReduceOp.SUM, group=group, algorithm="native")


def negotiate(kind: int, a: int = 0, b: int = 0, c: int = 0, process_set=global_process_set,
              name: str = "") -> comm.Work | None:
    """(An active rank, before an operation on the global set.) Tell joined ranks what comes;
    for OTHER operations wait and refuse while a rank has joined. Returns the header's
    handle for the caller to wait on with its operation (None: nothing in flight).

    Raises:
        ValueError: an operation other than an all-reduce while a rank has joined.
    """
    if process_set is not global_process_set:
        return None
    group = process_set.resolve()
    if group.size == 1:
        return None
    _COUNT[0] += 1
    header, work = _header(group, kind, a, b, c)
    if kind != OTHER:
        return work  # (an unwaited handle left at exit can abort the process)
    work.wait()
    if int(header[0]):
        raise ValueError(f"hvd.{name} while {int(header[0])} rank(s) have called "
                         "hvd.join(): only all-reduces (and DistributedOptimizer) go on "
                         "after a rank has joined")
    return None


def negotiate_allreduce(payload: torch.Tensor, op, process_set) -> comm.Work | None:
    """Before the all-reduce of ``payload`` (its wire dtype and op)."""
    if payload.dtype not in DTYPES:
        return negotiate(OTHER, process_set=process_set,
                         name=f"allreduce of {payload.dtype}")
    return negotiate(ALLREDUCE, payload.numel(), DTYPES.index(payload.dtype),
              OPS.index(comm.ReduceOp(op)), process_set=process_set)


@trace.traced("barrier")
def barrier(process_set=global_process_set) -> None:
    """Block until every member has arrived."""
    negotiate(OTHER, process_set=process_set, name="barrier")
    comm.barrier(process_set.resolve())


def _stand_in(kind: int, a: int, b: int, c: int, group: comm.Group) -> None:
    """A joined rank's part in an active rank's operation: zeros of the same shape."""
    if kind == ALLREDUCE:
        zeros = torch.zeros(a, dtype=DTYPES[b])
        comm.all_reduce(zeros, op=OPS[c], group=group)
    elif kind == OPTIMIZER:
        _OPTIMIZERS[a]().contribute_zeros()
    else:  # the active ranks raise the same error
        raise ValueError("an operation other than an all-reduce was started while this rank "
                         "had called hvd.join()")


@trace.traced("join")
def join(device=-1, process_set=global_process_set) -> int:
    """Stand in with zeros for the all-reduces the other ranks still start, until every
    rank has joined; return the global rank that joined last (the one that had negotiated
    the most operations; a tie goes to the later wall clock).

    Raises:
        ValueError: a ProcessSet other than the global one; an operation a joined rank
            cannot stand in for.
    """
    if process_set is not global_process_set:
        raise ValueError("hvd.join() works on the global process set only in gradsync")
    group = process_set.resolve()
    mine = torch.tensor([float(_COUNT[0]), time.time()], dtype=torch.float64)
    while group.size > 1:
        header, work = _header(group, 0, joined=True)
        work.wait()
        joined = int(header[0])
        if joined == group.size:
            break
        active = group.size - joined
        kind, a, b, c = (int(v) // active for v in header[1:])
        _stand_in(kind, a, b, c, group)
    _COUNT[0] = 0
    everyone = comm.all_gather([torch.empty_like(mine) for _ in range(group.size)], mine,
                               group=group)
    return max(range(group.size), key=lambda r: tuple(everyone[r].tolist()))
