"""Horovod's tensor collectives on gradsync.comm: each call is one comm collective (or a
short fixed sequence of them), with Horovod's semantics.

- The plain forms return a new tensor; the ``_`` forms write into the argument.
- ``*_async`` forms return a :class:`Handle`; ``poll(h)`` says whether it finished,
  ``synchronize(h)`` waits and returns the result. allreduce and broadcast overlap for
  real (comm's async collectives); allgather, alltoall and reducescatter run several
  collectives in sequence (a shape exchange first), so their handles are already complete
  when returned.
- Roots (``root_rank``) are global ranks, also in a process set, as in Horovod.
- ``Average`` is a sum followed by ``postscale_factor / size``; ``prescale_factor`` scales
  the input first. Integer tensors are scaled in float64 and truncated back, as Horovod's
  C++ ``ScaleBuffer`` does.
- ``name=`` is accepted and used only in error messages.
- Each operation on the global process set is announced first for ``hvd.join()``
  (join.py: one small all-reduce, overlapped for all-reduces).
- Results are detached: unlike Horovod's, these calls are not autograd functions.
"""

from __future__ import annotations


import torch

from .. import comm
from . import trace
from .basics import Average, ProcessSet, global_process_set, resolve_op, root_in
from .compression import Compression
from .join import OTHER, negotiate, negotiate_allreduce
from .shapes import exchange_shapes


class Handle:
    """An operation in flight; ``wait()`` finishes it once and returns its result."""

    def __init__(self, work: comm.Work | None, finish, result=None, name=None, tensor=None):
        self._work, self._finish, self._result, self._done = work, finish, result, False
        # (name, start, tensor) of the span on the script's timeline; None: not recorded
        self._span = (name, trace.perf_counter(), tensor) if name and trace.is_on() else None

    def is_completed(self) -> bool:
        return self._done or self._work is None or self._work.is_completed()

    def wait(self):
        if not self._done:
            if self._work is not None:
                self._work.wait()
            if self._finish is not None:
                self._result = self._finish()
            self._done = True
            if self._span is not None:
                trace.record(*self._span)
        return self._result


def poll(handle: Handle) -> bool:
    """Whether the operation of ``handle`` has finished (never blocks)."""
    return handle.is_completed()


def synchronize(handle: Handle):
    """Wait for ``handle``'s operation and return its result."""
    return handle.wait()


def _done(result) -> Handle:
    return Handle(None, None, result)


def _scale_(tensor: torch.Tensor, factor: float) -> None:
    if factor == 1.0:
        return
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.mul_(factor)
    else:  # integers: through float64, truncated back (Horovod's ScaleBuffer)
        tensor.copy_((tensor.double() * factor).to(tensor.dtype))


# --- allreduce ---------------------------------------------------------------------------------

def _allreduce_into(output: torch.Tensor, op, prescale_factor: float, postscale_factor: float,
                    compression, process_set: ProcessSet) -> Handle:
    """All-reduce ``output`` (the caller's copy, or the tensor itself) in place."""
    group = process_set.resolve()
    _scale_(output, prescale_factor)
    payload, ctx = compression.compress(output)   # e.g. (numel,) float16 for fp16
    wire = comm.ReduceOp.SUM if op is Average else op
    header = negotiate_allreduce(payload, wire, process_set)
    work = comm.all_reduce_async(payload, op=wire, group=group)
    post = postscale_factor / group.size if op is Average else postscale_factor

    def finish():
        if header is not None:
            header.wait()
        result = compression.decompress(payload, ctx)
        if result is not output:
            output.copy_(result)
        _scale_(output, post)
        return output

    return Handle(work, finish)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                     postscale_factor=1.0, process_set=global_process_set,
                     compression=Compression.none) -> Handle:
    """Start an all-reduce of ``tensor`` in place; see :func:`allreduce`."""
    op = resolve_op(op, average)
    handle = _allreduce_into(tensor.data, op, prescale_factor, postscale_factor, compression,
                             process_set)
    # the argument itself, not its .data alias
    return Handle(handle, lambda: tensor, name="allreduce", tensor=tensor)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                    postscale_factor=1.0, process_set=global_process_set,
                    compression=Compression.none) -> Handle:
    """Start an all-reduce into a new tensor; ``synchronize(handle)`` returns it."""
    op = resolve_op(op, average)
    handle = _allreduce_into(tensor.detach().clone(), op, prescale_factor, postscale_factor,
                             compression, process_set)
    return Handle(handle, handle.wait, name="allreduce", tensor=tensor)


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """The reduction of ``tensor`` over the process set, as a new tensor.

    Args:
        average: deprecated; True is ``op=Average``, False ``op=Sum``.
        op: Average (default), Sum, Min, Max or Product.
        prescale_factor, postscale_factor: multiply the input before / the result after.
    Raises:
        ValueError: Adasum; both ``op`` and ``average``; a process set this rank is not in.
    """
    return allreduce_async(tensor, average, name, op, prescale_factor, postscale_factor,
                           process_set, compression).wait()


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
               postscale_factor=1.0, process_set=global_process_set):
    """:func:`allreduce` in place; returns ``tensor``."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor,
                            process_set).wait()


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=global_process_set,
                             compression=Compression.none) -> Handle:
    """All-reduce a list of tensors in place, fused: one all-reduce per dtype."""
    op = resolve_op(op, average)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t.data)
    parts = []
    for members in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in members])  # (sum of numels,)
        parts.append((members, flat, _allreduce_into(flat, op, prescale_factor,
                                                     postscale_factor, compression,
                                                     process_set)))

    def finish():
        for members, flat, handle in parts:
            handle.wait()
            offset = 0
            for t in members:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        return list(tensors)

    return Handle(None, finish, name="grouped_allreduce")


def grouped_allreduce_async(tensors, *args, **kwargs) -> Handle:
    return grouped_allreduce_async_([t.detach().clone() for t in tensors], *args, **kwargs)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none,
                      op=None, prescale_factor=1.0, postscale_factor=1.0,
                      process_set=global_process_set) -> list[torch.Tensor]:
    """:func:`allreduce` of each tensor, fused into one all-reduce per dtype."""
    return grouped_allreduce_async(tensors, average, name, op, prescale_factor,
                                   postscale_factor, process_set, compression).wait()


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                       postscale_factor=1.0, process_set=global_process_set):
    return grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                    postscale_factor, process_set).wait()


# --- broadcast ---------------------------------------------------------------------------------

def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> Handle:
    """Start copying global rank ``root_rank``'s ``tensor`` into ``tensor`` everywhere."""
    group = process_set.resolve()
    negotiate(OTHER, process_set=process_set, name="broadcast")
    work = comm.broadcast_async(tensor.data, src=root_in(group, root_rank), group=group)
    return Handle(work, lambda: tensor, name="broadcast", tensor=tensor)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> Handle:
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Global rank ``root_rank``'s ``tensor``, as a new tensor on every member."""
    return broadcast_async(tensor, root_rank, name, process_set).wait()


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """:func:`broadcast` in place; returns ``tensor``."""
    return broadcast_async_(tensor, root_rank, name, process_set).wait()


# --- allgather (alltoall and reducescatter: exchange.py) ------------------------------------------

def _gather_padded(group: comm.Group, tensor: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Every member's ``tensor`` padded to (rows, *rest) with zeros: one all-gather."""
    padded = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[:tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(group.size)]
    return comm.all_gather(out, padded, group=group)


@trace.traced("allgather")
def allgather(tensor, name=None, process_set=global_process_set) -> torch.Tensor:
    """Every member's ``tensor`` concatenated along dim 0, in rank order; the first
    dimension may differ between ranks, the others and the dtype must not.

    Raises:
        ValueError: on every rank, when the ranks' shapes or dtypes do not fit together.
    """
    group = process_set.resolve()
    negotiate(OTHER, process_set=process_set, name="allgather")
    tensor = tensor.detach()
    shapes = exchange_shapes(group, tensor, "allgather", name, same_first=False)
    sizes = [s[0] for s in shapes]
    gathered = _gather_padded(group, tensor, max(sizes))
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def allgather_async(tensor, name=None, process_set=global_process_set) -> Handle:
    return _done(allgather(tensor, name, process_set))
