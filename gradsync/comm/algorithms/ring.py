"""Ring all-reduce: a reduce-scatter then an all-gather around the ring r -> r+1.

The tensor is cut into p chunks. In each of the p-1 reduce-scatter steps every rank sends
one chunk to its right neighbour and adds the chunk arriving from its left one; afterwards
rank r holds the finished chunk (r+1) mod p. The all-gather passes finished chunks along
for p-1 more steps. Each rank sends 2(p-1)/p * S bytes, the bandwidth lower bound for
all-reduce, so large tensors run at the link's speed.

Within a step a chunk travels as segments with one tag each: all receives are posted first,
then all sends, and the reduction of segment k overlaps the transfer of segment k+1.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P, chunk_bounds

SEGMENT_BYTES = 1 << 20  # 1 MiB segments: large enough to amortise a message, small enough to pipeline


def _segments(start: int, end: int, seg: int) -> list[tuple[int, int]]:
    return [(s, min(s + seg, end)) for s in range(start, end, seg)]


def _exchange(buf: torch.Tensor, send: tuple[int, int], recv: tuple[int, int],
              p2p: P2P, right: int, left: int, seg: int,
              scratch: torch.Tensor | None, op: ReduceOp | None) -> None:
    """Send ``buf[send]`` to ``right`` while receiving ``buf[recv]`` from ``left``.

    With ``op`` the incoming segments land in ``scratch`` and are combined into ``buf``;
    without it they are written straight into ``buf`` (all-gather).
    """
    recv_segs = _segments(*recv, seg)
    works = []
    for tag, (a, b) in enumerate(recv_segs):
        target = scratch[a - recv[0]:b - recv[0]] if op is not None else buf[a:b]
        works.append(p2p.irecv(target, left, tag))
    sends = [p2p.isend(buf[a:b], right, tag) for tag, (a, b) in enumerate(_segments(*send, seg))]
    for (a, b), work in zip(recv_segs, works):
        p2p.wait(work, left)
        if op is not None:
            combine_(buf[a:b], scratch[a - recv[0]:b - recv[0]], op)
    for work in sends:
        p2p.wait(work, right)


def _reduce_scatter_phase(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                          bounds: list[tuple[int, int]], seg: int) -> None:
    n, r = p2p.size, p2p.rank
    scratch = torch.empty(max(e - s for s, e in bounds), dtype=buf.dtype)
    for step in range(n - 1):
        send_chunk, recv_chunk = (r - step) % n, (r - step - 1) % n
        _exchange(buf, bounds[send_chunk], bounds[recv_chunk], p2p, (r + 1) % n, (r - 1) % n,
                  seg, scratch, op)


def ring_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                    segment_bytes: int = SEGMENT_BYTES) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place around the ring."""
    n, r = p2p.size, p2p.rank
    if n == 1 or buf.numel() == 0:
        return
    seg = max(1, segment_bytes // buf.element_size())
    bounds = chunk_bounds(buf.numel(), n)
    _reduce_scatter_phase(buf, op, p2p, bounds, seg)
    # Rank r now owns chunk (r+1) mod n; pass finished chunks along the ring.
    for step in range(n - 1):
        send_chunk, recv_chunk = (r + 1 - step) % n, (r - step) % n
        _exchange(buf, bounds[send_chunk], bounds[recv_chunk], p2p, (r + 1) % n, (r - 1) % n,
                  seg, None, None)


def ring_reduce_scatter(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                        segment_bytes: int = SEGMENT_BYTES) -> tuple[int, int]:
    """Reduce-scatter ``buf`` in place; returns the bounds of the chunk this rank owns.

    Chunk boundaries are :func:`chunk_bounds` of ``buf.numel()`` into ``p`` pieces; rank r
    ends up owning piece (r+1) mod p. Only that piece of ``buf`` is meaningful afterwards.
    """
    n, r = p2p.size, p2p.rank
    bounds = chunk_bounds(buf.numel(), n)
    if n > 1 and buf.numel() > 0:
        seg = max(1, segment_bytes // buf.element_size())
        _reduce_scatter_phase(buf, op, p2p, bounds, seg)
    return bounds[(r + 1) % n]


def ring_reduce_scatter_pieces(stage: torch.Tensor, op: ReduceOp, p2p: P2P) -> torch.Tensor:
    """The reduce-scatter collective on the ring: ``stage`` (p * k,) holds this rank's input
    for rank j at piece j; returns the (k,) piece ``rank`` reduced over all ranks.

    The ring leaves rank r owning chunk (r+1) mod p: the pieces are shifted by one
    ((p, k) rolled along dim 0, a copy) so that chunk r+1 holds piece r.
    """
    p, r = p2p.size, p2p.rank
    k = stage.numel() // p
    rotated = stage.view(p, k).roll(1, dims=0).reshape(-1)
    a, b = ring_reduce_scatter(rotated, op, p2p)
    return rotated[a:b]


def bus_factor(p: int) -> Fraction:
    """2(p-1)/p: the bytes each of ``p`` ranks must send per byte all-reduced (the ring's,
    the bandwidth lower bound), and nccl-tests' factor from algorithm to bus bandwidth.
    Half of it is a reduce-scatter's or an all-gather's share.

    Exact (a Fraction), so that ``int(bus_factor(p) * nbytes)`` floors byte counts as integer
    arithmetic does; times a float it is a float.

    Raises:
        ValueError: ``p`` < 1.
    """
    if p < 1:
        raise ValueError(f"bus_factor needs at least one rank, got p={p}")
    return Fraction(2 * (p - 1), p)


def ring_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages on the critical path, bytes on the wire, bytes reduced) for ``n`` bytes on
    ``p`` ranks: p - 1 steps each way, every rank sends 2(p-1)/p of the data and reduces
    half of that."""
    wire = float(bus_factor(p) * n)
    return 2 * (p - 1), wire, wire / 2
