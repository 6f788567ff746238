"""The collective primitives, named as in torch.distributed, on a :class:`Group`.

Every call takes ``group=None`` (the world) or a sub-group; roots (``src``, ``dst``) are ranks
*within* that group. Tensors are reduced in place, as in torch.distributed. Each collective
has an ``*_async`` twin returning a :class:`Work` whose ``wait()`` finishes it. The
collectives with a list of tensors, one per rank, are in per_rank.py.

``all_reduce`` runs either the engine's own algorithm (``native``) or one of gradsync's
(``ring``, ``tree``, ``halving_doubling``, ``reduce_broadcast``, and the network-aware
``aware`` and ``hierarchical``, which read the group's topology) on the engine's
point-to-point transfers; ``auto`` asks the cost model per call, with the topology.
``broadcast`` runs the engine's, ``aware`` (packed depth-2 trees) or ``shm``; its table and
the others' are algorithms/collective_registry.py.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from . import check
from .algorithms import REGISTRY, shm_fast
from .algorithms.collective_registry import (BROADCAST_ALGORITHMS, CollectiveAlgorithm,
                                             choose_collective_algorithm)
from .algorithms.registry import ALL_REDUCE_ALGORITHMS, check_algorithm
from .algorithms.ring import bus_factor
from .cost_model import DEFAULT_COST_MODEL, CostModel
from .errors import translate
from .group import Group, resolve
from .ops import ReduceOp, as_op, check_op_dtype, finish_, wire_op
from .p2p import P2P
from .work import Work

__all__ = ["ALL_REDUCE_ALGORITHMS", "BROADCAST_ALGORITHMS", "DEFAULT_COST_MODEL", "Work",
           "all_reduce", "all_reduce_async", "barrier", "broadcast", "broadcast_async",
           "dist_sum", "reduce", "reduce_async"]


def _bus_bytes(op: str, nbytes: int, p: int) -> int:
    """Bytes one rank sends, as nccl-tests counts bus traffic; used for the engine's own
    algorithms, whose messages gradsync does not see."""
    if op == "all_reduce":
        return int(bus_factor(p) * nbytes)
    if op in ("all_gather", "reduce_scatter"):
        return int(bus_factor(p) / 2 * nbytes)
    return nbytes if p > 1 else 0


def _failure(group: Group, exc: RuntimeError, what: str) -> Exception:
    """The engine's error, naming what failed and, from the heartbeats, which rank was lost."""
    error = translate(exc, what=f"{what} #{group.seq}{group.where()}", rank=group.rank)
    if group.monitor is not None:
        culprit = group.monitor.diagnose(group.seq)
        if culprit:
            error = type(error)(f"{error}; {culprit}")
    return error


def _engine(group: Group, op: str, launch: Callable[[], object],
            after: Callable[[], object] | None, nbytes: int, async_op: bool,
            what: str | None = None):
    """Run the engine's own collective ``op`` (``launch`` starts it and returns its handle)
    and translate its errors; ``what`` names it in them (default: ``op``)."""
    what = what or op
    group.stats.bytes_sent += _bus_bytes(op, nbytes, group.size)
    try:
        handle = launch()
    except RuntimeError as exc:
        raise _failure(group, exc, what) from exc

    def finish():
        try:
            if handle is not None:
                handle.wait()
        except RuntimeError as exc:
            raise _failure(group, exc, what) from exc
        return after() if after is not None else None

    work = Work(finish, group=group, seq=group.seq)
    return work if async_op else work.wait()


def _own(group: Group, fn: Callable[[], object], async_op: bool):
    """Run one of gradsync's algorithms on the group's comm thread, in issue order.

    A blocking call with nothing queued runs inline: only the thread that issues calls can
    add to the queue, so nothing can overtake it and the thread hop is saved.
    """
    with group._lock:
        inline = not async_op and group._pending == 0
        if not inline:
            group._pending += 1
    seq = group.seq
    if inline:
        result = fn()
        group.finished_seq = max(group.finished_seq, seq)
        return result

    def job():
        try:
            return fn()
        finally:
            with group._lock:
                group._pending -= 1

    future = group.executor().submit(job)
    work = Work(future.result, group=group, seq=seq)
    return work if async_op else work.wait()


def _prologue(group: Group, op: str, tensor: torch.Tensor | None, **meta) -> None:
    group.stats.calls += 1
    group.seq += 1
    group.current_op = op
    group.op_started = time.monotonic()
    if group.check:
        header = check.encode(group.seq, op, tensor, **meta)
        check.verify_call(group, header, f"call #{group.seq}")


# --- all_reduce ------------------------------------------------------------------------------

def all_reduce_async(tensor: torch.Tensor, op: ReduceOp | str = ReduceOp.SUM,
                     group: Group | None = None, algorithm: str = "auto",
                     cost_model: CostModel | None = None) -> Work:
    """Start an all-reduce of ``tensor`` in place; see :func:`all_reduce`."""
    return _all_reduce(tensor, op, group, algorithm, cost_model, async_op=True)


def all_reduce(tensor: torch.Tensor, op: ReduceOp | str = ReduceOp.SUM,
               group: Group | None = None, algorithm: str = "auto",
               cost_model: CostModel | None = None) -> torch.Tensor:
    """Reduce ``tensor`` across the group in place; every rank gets the bitwise-same result.

    Args:
        tensor: any shape; non-contiguous tensors are reduced through a contiguous copy.
        op: sum, avg, max, min or prod.
        algorithm: one of ALL_REDUCE_ALGORITHMS.
        cost_model: for ``auto``; defaults to figures measured on loopback.
    Returns:
        ``tensor``.
    Raises:
        ValueError / TypeError: unknown algorithm or op; avg on an integer tensor.
        CommError: a peer was lost or the timeout expired (the message names the rank).
    """
    if cost_model is None and shm_fast.try_all_reduce(tensor, op, group, algorithm):
        return tensor   # a small call on one host, planned by an earlier call (shm_fast.py)
    return _all_reduce(tensor, op, group, algorithm, cost_model, async_op=False)


def _all_reduce(tensor, op, group, algorithm, cost_model, async_op):
    given = (tensor.shape, tensor.dtype, op, algorithm)    # shm_fast's key for this call
    group, op = resolve(group), as_op(op)
    check_op_dtype(op, tensor.dtype)
    check_algorithm(algorithm)
    nbytes = tensor.numel() * tensor.element_size()
    if algorithm == "auto":
        algorithm = _auto(group, cost_model, nbytes)
    if cost_model is None and not async_op:
        shm_fast.remember(group, given, op, algorithm, nbytes, tensor)
    _prologue(group, "all_reduce", tensor, algorithm=algorithm, reduce_op=op.value)
    what = f"all_reduce({algorithm})"
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)

    def done():
        finish_(flat, op, group.size)
        if flat.data_ptr() != tensor.data_ptr() or not tensor.is_contiguous():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    fn = REGISTRY[algorithm].run
    if fn is None:  # the engine's own
        return _engine(group, "all_reduce", lambda: group.engine.all_reduce(flat, op, group.pg),
                       done, nbytes, async_op, what)
    seq = group.seq

    def run():
        fn(flat, wire_op(op), P2P(group, f"{what} #{seq}{group.where()}"))
        return done()

    return _own(group, run, async_op)


def _auto(group: Group, cost_model: CostModel | None, nbytes: int) -> str:
    """The cost model's choice for ``nbytes`` on ``group``. The default model's choice is
    remembered per group and size (``set_topology`` forgets them): a loss average called
    every step should not pay for the prediction (about 30 us of Python) each time. A
    caller's own model may change between calls, so it is asked every time."""
    if cost_model is not None:
        return cost_model.choose(nbytes, group.size, topology=group.topology)
    choice = group.auto_choices.get(nbytes)
    if choice is None:
        if len(group.auto_choices) > 4096:
            group.auto_choices.clear()
        choice = DEFAULT_COST_MODEL.choose(nbytes, group.size, topology=group.topology)
        group.auto_choices[nbytes] = choice
    return choice


# --- the other collectives, on the engine -------------------------------------------------------

def one_host(group: Group) -> bool:
    """Whether the group's topology puts all of its (several) ranks on one host."""
    topology = group.topology
    return group.size > 1 and topology is not None and len(topology.hosts) == 1


def resolve_auto(group: Group, collective: str, algorithm: str) -> CollectiveAlgorithm:
    """The table entry (algorithms/collective_registry.py) of ``collective`` that
    ``algorithm`` names on ``group``: ``auto`` is shared memory when the group's topology
    says one host, else the table's choice across hosts (the engine's own but for
    reduce-scatter, gradsync's ring).

    Raises:
        ValueError: unknown algorithm (the message lists them).
    """
    return choose_collective_algorithm(collective, algorithm, one_host(group))


def broadcast_async(tensor: torch.Tensor, src: int = 0, group: Group | None = None,
                    algorithm: str = "auto") -> Work:
    """Start a broadcast of ``tensor`` from group rank ``src``; see :func:`broadcast`."""
    return _broadcast(tensor, src, group, algorithm, async_op=True)


def broadcast(tensor: torch.Tensor, src: int = 0, group: Group | None = None,
              algorithm: str = "auto") -> torch.Tensor:
    """Copy ``tensor`` of group rank ``src`` into ``tensor`` on every rank.

    Args:
        algorithm: ``native`` (the engine's), ``aware`` (pieces sized to the links of the
            group's topology, relayed by every rank: algorithms/aware.py), ``shm`` (through
            shared memory, every rank on one host) or ``auto`` (``shm`` when the group's
            topology says one host, else ``native``).
    Raises:
        ValueError: unknown algorithm, or ``src`` is not a rank of the group.
    """
    return _broadcast(tensor, src, group, algorithm, async_op=False)


def _broadcast(tensor, src, group, algorithm, async_op):
    group = resolve(group)
    chosen = resolve_auto(group, "broadcast", algorithm)
    if not 0 <= src < group.size:
        raise ValueError(f"broadcast src {src} is not a rank of this group of {group.size}")
    _prologue(group, "broadcast", tensor, root=src, algorithm=chosen.name)
    if chosen.run is None:  # the engine's own
        return _engine(group, "broadcast", lambda: group.engine.broadcast(
            tensor, group.global_rank(src), group.pg),
            lambda: tensor, tensor.numel() * tensor.element_size(), async_op)
    what = f"broadcast({chosen.name}) #{group.seq}{group.where()}"
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)

    def run():
        chosen.run(flat, src, P2P(group, what))
        if flat.data_ptr() != tensor.data_ptr() or not tensor.is_contiguous():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    return _own(group, run, async_op)


def reduce_async(tensor: torch.Tensor, dst: int = 0, op: ReduceOp | str = ReduceOp.SUM,
                 group: Group | None = None) -> Work:
    group, op = resolve(group), as_op(op)
    check_op_dtype(op, tensor.dtype)
    _prologue(group, "reduce", tensor, reduce_op=op.value, root=dst)

    def after():
        if group.rank == dst:
            finish_(tensor, op, group.size)
        return tensor

    return _engine(group, "reduce", lambda: group.engine.reduce(
        tensor, group.global_rank(dst), op, group.pg),
        after, tensor.numel() * tensor.element_size(), True)


def reduce(tensor: torch.Tensor, dst: int = 0, op: ReduceOp | str = ReduceOp.SUM,
           group: Group | None = None) -> torch.Tensor:
    """Reduce into ``tensor`` on group rank ``dst``; other ranks' tensors are left undefined
    (the engine may use them as scratch)."""
    return reduce_async(tensor, dst, op, group).wait()


def dist_sum(value: int, group: Group | None = None) -> int:
    """The sum of one integer over the group's ranks (collective): e.g. how many ranks failed,
    so that all of them take the same branch."""
    t = torch.tensor([value], dtype=torch.int64)
    all_reduce(t, op=ReduceOp.SUM, group=group, algorithm="native")
    return int(t.item())


def barrier(group: Group | None = None) -> None:
    """Block until every rank of the group has arrived."""
    group = resolve(group)
    _prologue(group, "barrier", None)
    _engine(group, "barrier", lambda: group.engine.barrier(group.pg), None, 0, False)
