"""Shared-memory collectives for ranks on one host: no sockets, just copies and flags.

Gloo moves even 1 KiB through the loopback TCP stack (about 500 us on the 2-core machine);
DeepSpeed's SHM all-reduce does 32 MB in 0.65 ms where gloo needs 30.7 ms (shared/ANCHORS.md,
"One host, shared memory"). The ranks of a view share one segment (shm_segment.py): a slot
per rank, an output area, and two counters per rank: ``arrived`` (my slot holds call s's
data) and ``done`` (I have finished reading the slots of call s).

Every call s first waits until everyone is done with call s - 1's slots (free after an
all-reduce, which already waited for it), then:

- all_reduce: copy in to slot r, arrive; reduce piece r (chunk_bounds) across slots 0..p-1
  in rank order into out, done; wait for all done; copy out. Every element is computed
  once, so every rank reads bitwise the same result. Out is rewritten in call s + 1 only
  after everyone arrived there, so after everyone copied it out.
- reduce_scatter: copy in, arrive; reduce piece r into the caller's tensor, done.
- all_gather: rank r copies its piece into slot r, arrive; wait; copy every slot's piece
  out, done.
- broadcast: the root copies into its slot and arrives; the others wait for the root only,
  copy out, done.

Ranks of a view must call the same collectives in the same order (as with any engine).

:func:`resident_all_reduce` serves buffers that already live in a segment's slots
(comm/shared_buckets.py): no copy in, no out area, no copy out; see there.
"""

from __future__ import annotations

import functools

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P, chunk_bounds
from .ring import bus_factor
from .shm_segment import Segment, drop, remove_stale, segment, wait_for

__all__ = ["remove_stale", "resident_all_reduce", "shm_all_gather", "shm_all_gather_pieces",
           "shm_all_reduce", "shm_broadcast", "shm_reduce_scatter", "shm_reduce_scatter_pieces",
           "shm_shape"]

ARRIVED, DONE, GATHERED = 0, 1, 2
# Up to this size every rank reduces the whole buffer: p small reductions cost less than a
# second wait for the others (measured on 2 ranks: docs/benchmarks.md, small messages).
SMALL_BYTES = 64 << 10


def _begin(p2p: P2P, nbytes: int) -> tuple[Segment, int]:
    """The view's segment (slots of at least ``nbytes``) and this call's sequence number,
    once every member is done reading the previous call's slots."""
    seg = segment(p2p, nbytes)
    seg.seq += 1
    if seg.seq > 1:
        wait_for(seg, DONE, seg.seq - 1, p2p)
    return seg, seg.seq


def _post(seg: Segment, phase: int, s: int, rank: int) -> None:
    seg.post(phase, rank, s)        # after a fence: the data before the flag


def _wrote(p2p: P2P, nbytes: int) -> None:
    """Count bytes this rank writes into shared memory (the group's ``stats.bytes_shm``)."""
    p2p.group.stats.bytes_shm += nbytes


def _reduce_piece(seg: Segment, out: torch.Tensor, a: int, b: int, n: int, op: ReduceOp) -> None:
    """``out`` (b - a,) := slot 0[a:b] op slot 1[a:b] op ... in rank order: the same bits
    whichever rank computes it."""
    out.copy_(seg.slot(0, n, out.dtype)[a:b])
    for j in range(1, seg.p):
        combine_(out, seg.slot(j, n, out.dtype)[a:b], op)


def _guarded(fn):
    """A failed call (timeout, lost rank) drops the segment: a later call makes a new one."""
    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except BaseException:
            drop(args[-1])  # every function here takes the view last
            raise
    return call


@_guarded
def shm_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place through the view's segment.

    Raises:
        ValueError: the members are not all on this host.
        CommTimeoutError / PeerLostError: a member did not arrive in time / died.
    """
    p, r, n = p2p.size, p2p.rank, buf.numel()
    if p == 1 or n == 0:
        return
    seg, s = _begin(p2p, n * buf.element_size())
    seg.slot(r, n, buf.dtype).copy_(buf)
    _wrote(p2p, n * buf.element_size())
    _post(seg, ARRIVED, s, r)
    wait_for(seg, ARRIVED, s, p2p)
    if n * buf.element_size() <= SMALL_BYTES:
        # Every rank reduces the whole (small) buffer itself, in rank order as below (so
        # the same bits): one wait per call instead of two, no out area, no copy out.
        buf.copy_(seg.slot(0, n, buf.dtype))
        for j in range(1, p):
            combine_(buf, seg.slot(j, n, buf.dtype), op)
        _post(seg, DONE, s, r)
        return
    a, b = chunk_bounds(n, p)[r]
    if b > a:
        _reduce_piece(seg, seg.slot(p, n, buf.dtype)[a:b], a, b, n, op)
        _wrote(p2p, (b - a) * buf.element_size())
    _post(seg, DONE, s, r)
    wait_for(seg, DONE, s, p2p)
    buf.copy_(seg.slot(p, n, buf.dtype))


@_guarded
def shm_reduce_scatter(buf: torch.Tensor, op: ReduceOp, p2p: P2P) -> tuple[int, int]:
    """Reduce ``buf`` (numel,) across the view; afterwards ``buf[a:b]`` holds the reduced
    piece ``(a, b) = chunk_bounds(numel, p)[rank]`` (returned), the rest is this rank's
    input. :func:`shm_all_gather` with the same bounds completes it."""
    p, r, n = p2p.size, p2p.rank, buf.numel()
    a, b = chunk_bounds(n, p)[r] if n else (0, 0)
    if p == 1 or n == 0:
        return a, b
    seg, s = _begin(p2p, n * buf.element_size())
    seg.slot(r, n, buf.dtype).copy_(buf)
    _wrote(p2p, n * buf.element_size())
    _post(seg, ARRIVED, s, r)
    wait_for(seg, ARRIVED, s, p2p)
    if b > a:
        _reduce_piece(seg, buf[a:b], a, b, n, op)
    _post(seg, DONE, s, r)
    return a, b


@_guarded
def shm_all_gather(buf: torch.Tensor, bounds: list[tuple[int, int]], p2p: P2P) -> None:
    """Complete ``buf`` (numel,) in place when position j holds ``buf[bounds[j]]``: every
    piece is copied from its owner's slot (where it was written at offset 0)."""
    p, r = p2p.size, p2p.rank
    widest = max(b - a for a, b in bounds)
    if p == 1 or widest == 0:
        return
    seg, s = _begin(p2p, widest * buf.element_size())
    a, b = bounds[r]
    seg.slot(r, b - a, buf.dtype).copy_(buf[a:b])
    _wrote(p2p, (b - a) * buf.element_size())
    _post(seg, ARRIVED, s, r)
    wait_for(seg, ARRIVED, s, p2p)
    for j, (a, b) in enumerate(bounds):
        if j != r and b > a:
            buf[a:b].copy_(seg.slot(j, b - a, buf.dtype))
    _post(seg, DONE, s, r)


def shm_reduce_scatter_pieces(stage: torch.Tensor, op: ReduceOp, p2p: P2P) -> torch.Tensor:
    """The reduce-scatter collective: ``stage`` (p * k,) holds this rank's input for rank j
    at piece j; returns the (k,) piece ``rank`` reduced over all ranks (a view of ``stage``)."""
    a, b = shm_reduce_scatter(stage, op, p2p)  # chunk_bounds of p * k into p: piece rank
    return stage[a:b]


def shm_all_gather_pieces(stage: torch.Tensor, p2p: P2P) -> None:
    """The all-gather collective: ``stage`` (p * k,) holds this rank's k elements at piece
    ``rank``; afterwards piece j holds rank j's, on every rank."""
    shm_all_gather(stage, chunk_bounds(stage.numel(), p2p.size), p2p)


@_guarded
def shm_broadcast(buf: torch.Tensor, root: int, p2p: P2P) -> None:
    """Copy position ``root``'s ``buf`` (1-D, contiguous) into everyone's: one copy in, one
    copy out per rank, and the others wait for the root alone."""
    p, r, n = p2p.size, p2p.rank, buf.numel()
    if p == 1 or n == 0:
        return
    seg, s = _begin(p2p, n * buf.element_size())
    if r == root:
        seg.slot(r, n, buf.dtype).copy_(buf)
        _wrote(p2p, n * buf.element_size())
    _post(seg, ARRIVED, s, r)
    if r != root:
        wait_for(seg, ARRIVED, s, p2p, only=root)
        buf.copy_(seg.slot(root, n, buf.dtype))
    _post(seg, DONE, s, r)


def resident_all_reduce(seg: Segment, offset: int, n: int, dtype, op: ReduceOp,
                        p2p: P2P) -> None:
    """All-reduce the ``n`` elements of ``dtype`` at byte ``offset`` of every member's slot,
    in place: afterwards each member's slot region holds the result.

    The region must be written before the call and not touched by its owner until the call
    returns. Three waits, no copy of the whole region in or out:

    1. arrive; wait for all: every region holds its rank's input.
    2. rank r reduces piece r (chunk_bounds) of all regions in rank order into a scratch
       piece, then writes it over piece r of its own region; nobody else reads that piece of
       region r in this phase (rank j reads piece j). done; wait for all.
    3. rank r copies piece j of region j into its own region, for every j != r; gathered;
       wait for all, so that no rank rewrites its region (the next backward) while another
       still copies from it.
    """
    p, r = p2p.size, p2p.rank
    if p == 1 or n == 0:
        return
    seg.seq += 1
    s = seg.seq
    size = n * dtype.itemsize

    def region(j: int) -> torch.Tensor:
        return seg.slot(j, (offset + size) // dtype.itemsize, dtype)[offset // dtype.itemsize:]

    _wrote(p2p, size)    # its reduced piece and the others' pieces, into its own region
    _post(seg, ARRIVED, s, r)
    wait_for(seg, ARRIVED, s, p2p)
    bounds = chunk_bounds(n, p)
    a, b = bounds[r]
    mine = region(r)
    if b > a:
        if r <= 1:
            # Fold straight into this rank's own piece: it is operand 0 or 1, and the first
            # combination is commutative bit for bit, so the order stays rank order.
            piece = mine[a:b]
            for j in (1 - r, *range(2, p)):
                combine_(piece, region(j)[a:b], op)
        else:  # operand r is still needed when the fold reaches it: fold aside
            piece = region(0)[a:b].clone()
            for j in range(1, p):
                combine_(piece, region(j)[a:b], op)
            mine[a:b].copy_(piece)
    _post(seg, DONE, s, r)
    wait_for(seg, DONE, s, p2p)
    for j, (a, b) in enumerate(bounds):
        if j != r and b > a:
            mine[a:b].copy_(region(j)[a:b])
    _post(seg, GATHERED, s, r)
    wait_for(seg, GATHERED, s, p2p)


def shm_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages, wire bytes, reduced bytes) for ``n`` bytes on ``p`` ranks: two flag waits
    stand for messages; the "wire" is memory, and each rank copies n bytes in and n bytes
    out (its reads of the others' slots are the reduction's operands); each rank combines
    its 1/p piece with p - 1 others, (p - 1)/p * n bytes (half the bus factor)."""
    return 2, 2 * n, float(bus_factor(p) / 2 * n)
