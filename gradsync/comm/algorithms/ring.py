"""Ring all-reduce: a reduce-scatter then an all-gather around the ring r -> r+1.

The tensor is cut into p chunks. In each of the p-1 reduce-scatter steps every rank sends
one chunk to its right neighbour and adds the chunk arriving from its left one; afterwards
rank r holds the finished chunk (r+1) mod p. The all-gather passes finished chunks along
for p-1 more steps. Each rank sends 2(p-1)/p * S bytes, the bandwidth lower bound for
all-reduce, so large tensors run at the link's speed.

Chunks travel as segments (``SEGMENT_BYTES``), and the ring is pipelined across its steps:
the segment a rank receives (and reduces) at step s is the one it sends at step s+1, so it
sends it as soon as it is final instead of after the whole step (the classic pipelined
ring, as NCCL's ring runs). Step by step, each step boundary is a bubble: the link idles
while the step's last segment is reduced and the next step's receives are announced (gloo
sends only once the receive is posted). In the all-reduce the all-gather continues the
same pipeline: step p - 1 forwards the segments step p - 2 finished. Measured in the 3-host
lab at 1 Gbit the bubble was small (docs/benchmarks.md section 17, "The ring pipelined
across steps").

The step-by-step version (every segment of a step received and reduced before the next
step sends) stays below as the oracle: both compute each element as the same chain of
``combine_`` calls in the same order, so their results are bitwise equal
(tests/test_ring_pipeline.py holds the pipelined ring to it).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P, chunk_bounds

SEGMENT_BYTES = 1 << 20  # 1 MiB segments: large enough to amortise a message, small enough to pipeline


def _segments(start: int, end: int, seg: int) -> list[tuple[int, int]]:
    return [(s, min(s + seg, end)) for s in range(start, end, seg)]


# --- step by step: the oracle --------------------------------------------------------------

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


def ring_all_reduce_stepwise(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                             segment_bytes: int = SEGMENT_BYTES) -> None:
    """The step-by-step ring all-reduce: the oracle of :func:`ring_all_reduce`."""
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


def ring_reduce_scatter_stepwise(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                                 segment_bytes: int = SEGMENT_BYTES) -> tuple[int, int]:
    """The step-by-step ring reduce-scatter: the oracle of :func:`ring_reduce_scatter`."""
    n, r = p2p.size, p2p.rank
    bounds = chunk_bounds(buf.numel(), n)
    if n > 1 and buf.numel() > 0:
        seg = max(1, segment_bytes // buf.element_size())
        _reduce_scatter_phase(buf, op, p2p, bounds, seg)
    return bounds[(r + 1) % n]


# --- pipelined across steps (what the algorithm tables run) --------------------------------

def _finish(sends: list[list], last: int, p2p: P2P, right: int) -> None:
    """Wait for every send of steps 0..``last`` not yet waited (``sends[g]``: step g's)."""
    for step in sends[:last + 1]:
        while step:
            p2p.wait(step.pop(), right)


def _pipeline(buf: torch.Tensor, op: ReduceOp, p2p: P2P, bounds: list[tuple[int, int]],
              seg: int, steps: int) -> None:
    """Run ``steps`` ring steps (p - 1: reduce-scatter; 2(p - 1): all-reduce) as one pipeline.

    Step g sends chunk (r - g) mod p and receives chunk (r - g - 1) mod p, the one step g + 1
    sends: so segment k of step g + 1 leaves as soon as segment k of step g has arrived and,
    for g < p - 1, been combined into ``buf`` (in the all-gather steps it lands in ``buf``
    directly). Step g + 1's receives are posted when step g's processing starts, so the left
    neighbour's forwards never wait for them. Segment k of step g travels on tag
    g * per_step + k: unique per (step, segment), at most 2(p - 1) * per_step of them.

    ``bounds`` (p pieces of ``buf``, (start, end)) may list the pieces in any order: the
    ring's chunk c is ``bounds[c]`` (ring_reduce_scatter_pieces shifts them by one).
    Memory: two rows of the largest chunk for the incoming segments (the step-by-step ring
    needs one).
    """
    n, r = p2p.size, p2p.rank
    right, left = (r + 1) % n, (r - 1) % n
    per_step = max(-(-(b - a) // seg) for a, b in bounds)  # the same on every rank
    # (2, largest chunk): reduce-scatter steps g and g + 1 land in alternate rows, so step
    # g + 1's receives can be posted while step g's segments are still being combined.
    scratch = buf.new_empty((min(2, n - 1), max(b - a for a, b in bounds)))

    def post(g: int) -> list:
        lo = bounds[(r - g - 1) % n][0]
        return [p2p.irecv(scratch[g % 2, a - lo:b - lo] if g < n - 1 else buf[a:b], left,
                          g * per_step + k)
                for k, (a, b) in enumerate(_segments(*bounds[(r - g - 1) % n], seg))]

    recvs = post(0)
    sends = [[p2p.isend(buf[a:b], right, k)
              for k, (a, b) in enumerate(_segments(*bounds[r], seg))]]
    for g in range(steps):
        following = []
        if g + 1 < steps:
            # An all-gather step g + 1 writes chunk (r - g - 2) of buf, which step g + 2 - p
            # sent: finish those sends first (p = 2: this step's own), and, to bound the
            # handles kept, every send older than step g (they left during step g - 1).
            _finish(sends, max(g - 1, g + 2 - n if g + 1 >= n - 1 else -1), p2p, right)
            following = post(g + 1)
        lo, forward = bounds[(r - g - 1) % n][0], []
        for k, ((a, b), work) in enumerate(zip(_segments(*bounds[(r - g - 1) % n], seg), recvs)):
            p2p.wait(work, left)
            if g < n - 1:
                combine_(buf[a:b], scratch[g % 2, a - lo:b - lo], op)
            if g + 1 < steps:
                forward.append(p2p.isend(buf[a:b], right, (g + 1) * per_step + k))
        sends.append(forward)
        recvs = following
    _finish(sends, len(sends) - 1, p2p, right)


def ring_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                    segment_bytes: int = SEGMENT_BYTES) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place around the ring, pipelined across steps."""
    n = p2p.size
    if n == 1 or buf.numel() == 0:
        return
    seg = max(1, segment_bytes // buf.element_size())
    _pipeline(buf, op, p2p, chunk_bounds(buf.numel(), n), seg, 2 * (n - 1))


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
        _pipeline(buf, op, p2p, bounds, seg, n - 1)
    return bounds[(r + 1) % n]


def ring_reduce_scatter_pieces(stage: torch.Tensor, op: ReduceOp, p2p: P2P,
                               segment_bytes: int = SEGMENT_BYTES) -> torch.Tensor:
    """The reduce-scatter collective on the ring: ``stage`` (p * k,) holds this rank's input
    for rank j at piece j; returns the (k,) piece ``rank`` reduced over all ranks (a view of
    ``stage``, which the ring overwrites).

    The ring leaves rank r owning its chunk (r+1) mod p, so the ring's chunk c is piece
    (c-1) mod p of ``stage``: the same chains of additions as rolling the (p, k) pieces by
    one along dim 0 and reducing chunk r+1 (what this did before, through a (p * k,) copy).
    """
    p, r = p2p.size, p2p.rank
    k = stage.numel() // p
    if p > 1 and k > 0:
        bounds = [((c - 1) % p * k, ((c - 1) % p + 1) * k) for c in range(p)]
        seg = max(1, segment_bytes // stage.element_size())
        _pipeline(stage, op, p2p, bounds, seg, p - 1)
    return stage[r * k:(r + 1) * k]


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
