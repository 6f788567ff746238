"""The collectives with one tensor per rank in a list: all_gather, gather, scatter and
reduce_scatter, on the engine (reduce_scatter also on gradsync's ring; both reduce_scatter
and all_gather through shared memory when the ranks share a host). The algorithms of
all_gather and reduce_scatter are listed in algorithms/collective_registry.py.

They share collectives.py's machinery (check mode's prologue, the engine's error
translation, the comm thread) and only add the list's checks.
"""

from __future__ import annotations

import torch

from .algorithms.collective_registry import ALL_GATHER_ALGORITHMS, REDUCE_SCATTER_ALGORITHMS
from .collectives import _engine, _own, _prologue, resolve_auto
from .group import Group, resolve
from .ops import ReduceOp, as_op, check_op_dtype, finish_, wire_op
from .p2p import P2P
from .work import Work

__all__ = ["ALL_GATHER_ALGORITHMS", "REDUCE_SCATTER_ALGORITHMS", "all_gather",
           "all_gather_async", "gather", "gather_async", "reduce_scatter",
           "reduce_scatter_async", "scatter", "scatter_async"]


def all_gather_async(tensor_list: list[torch.Tensor], tensor: torch.Tensor,
                     group: Group | None = None, algorithm: str = "auto") -> Work:
    group = resolve(group)
    chosen = resolve_auto(group, "all_gather", algorithm)
    _prologue(group, "all_gather", tensor, algorithm=chosen.name)
    _expect_list(tensor_list, group, tensor, "all_gather")
    if chosen.run is None:  # the engine's own
        return _engine(group, "all_gather", lambda: group.engine.all_gather(
            tensor_list, tensor, group.pg), lambda: tensor_list,
            tensor.numel() * tensor.element_size() * group.size, True)
    what = f"all_gather({chosen.name}) #{group.seq}"

    def run():
        # (p * k,) staging: piece j is rank j's tensor; every rank fills in the others'.
        p, k = group.size, tensor.numel()
        stage = torch.empty(p * k, dtype=tensor.dtype)
        stage[group.rank * k:(group.rank + 1) * k].copy_(tensor.reshape(-1))
        chosen.run(stage, P2P(group, what))
        for j, out in enumerate(tensor_list):
            out.copy_(stage[j * k:(j + 1) * k].view_as(out))
        return tensor_list

    return _own(group, run, True)


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor,
               group: Group | None = None, algorithm: str = "auto") -> list[torch.Tensor]:
    """Fill ``tensor_list[i]`` with rank i's ``tensor`` on every rank.

    Args:
        algorithm: ``native`` (the engine's), ``shm`` (shared memory, one host) or ``auto``
            (``shm`` when the group's topology says one host).
    """
    return all_gather_async(tensor_list, tensor, group, algorithm).wait()


def gather_async(tensor: torch.Tensor, gather_list: list[torch.Tensor] | None = None,
                 dst: int = 0, group: Group | None = None) -> Work:
    group = resolve(group)
    _prologue(group, "gather", tensor, root=dst)
    if group.rank == dst:
        _expect_list(gather_list, group, tensor, "gather")
    return _engine(group, "gather", lambda: group.engine.gather(
        tensor, gather_list if group.rank == dst else None, group.global_rank(dst),
        group.pg), lambda: gather_list,
        tensor.numel() * tensor.element_size(), True)


def gather(tensor: torch.Tensor, gather_list: list[torch.Tensor] | None = None, dst: int = 0,
           group: Group | None = None) -> list[torch.Tensor] | None:
    """Collect every rank's ``tensor`` into ``gather_list`` on group rank ``dst``."""
    return gather_async(tensor, gather_list, dst, group).wait()


def scatter_async(tensor: torch.Tensor, scatter_list: list[torch.Tensor] | None = None,
                  src: int = 0, group: Group | None = None) -> Work:
    group = resolve(group)
    _prologue(group, "scatter", tensor, root=src)
    if group.rank == src:
        _expect_list(scatter_list, group, tensor, "scatter")
    return _engine(group, "scatter", lambda: group.engine.scatter(
        tensor, scatter_list if group.rank == src else None, group.global_rank(src),
        group.pg), lambda: tensor,
        tensor.numel() * tensor.element_size(), True)


def scatter(tensor: torch.Tensor, scatter_list: list[torch.Tensor] | None = None, src: int = 0,
            group: Group | None = None) -> torch.Tensor:
    """Copy ``scatter_list[i]`` of group rank ``src`` into ``tensor`` on rank i."""
    return scatter_async(tensor, scatter_list, src, group).wait()


def reduce_scatter_async(output: torch.Tensor, input_list: list[torch.Tensor],
                         op: ReduceOp | str = ReduceOp.SUM, group: Group | None = None,
                         algorithm: str = "auto") -> Work:
    group, op = resolve(group), as_op(op)
    check_op_dtype(op, output.dtype)
    chosen = resolve_auto(group, "reduce_scatter", algorithm)
    _prologue(group, "reduce_scatter", output, reduce_op=op.value, algorithm=chosen.name)
    _expect_list(input_list, group, output, "reduce_scatter")
    what = f"reduce_scatter({chosen.name})"
    # (p * k,) staging buffer: an own algorithm reduces it in place; the engine reads it.
    stage = torch.cat([t.reshape(-1) for t in input_list])
    k = output.numel()

    def done():
        finish_(output, op, group.size)
        return output

    if chosen.run is None:  # the engine's own
        out = output.view(-1) if output.is_contiguous() else torch.empty(k, dtype=output.dtype)

        def after():
            if out.data_ptr() != output.data_ptr():
                output.copy_(out.view_as(output))
            return done()

        return _engine(group, "reduce_scatter", lambda: group.engine.reduce_scatter(
            out, stage, op, group.pg), after, stage.numel() * stage.element_size(), True, what)

    seq = group.seq

    def run():
        # Piece j of the (p*k,) stage is input_list[j]; the algorithm returns piece
        # ``rank`` reduced over every rank.
        piece = chosen.run(stage, wire_op(op), P2P(group, f"{what} #{seq}"))
        output.copy_(piece.view_as(output))
        return done()

    return _own(group, run, True)


def reduce_scatter(output: torch.Tensor, input_list: list[torch.Tensor],
                   op: ReduceOp | str = ReduceOp.SUM, group: Group | None = None,
                   algorithm: str = "auto") -> torch.Tensor:
    """Reduce ``input_list[i]`` across ranks into ``output`` on rank i.

    Args:
        algorithm: ``native`` (the engine's), ``ring`` (gradsync's), ``shm`` (shared
            memory, one host) or ``auto`` (``shm`` when the topology says one host).
    """
    return reduce_scatter_async(output, input_list, op, group, algorithm).wait()


def _expect_list(tensors, group: Group, like: torch.Tensor, what: str) -> None:
    if tensors is None or len(tensors) != group.size:
        got = "None" if tensors is None else f"{len(tensors)} tensors"
        raise ValueError(f"{what} needs a list of {group.size} tensors (one per rank), got {got}")
    for i, t in enumerate(tensors):
        if t.shape != like.shape or t.dtype != like.dtype:
            raise ValueError(f"{what}: list entry {i} is {t.dtype}{list(t.shape)}, "
                             f"expected {like.dtype}{list(like.shape)}")
