"""Bandwidth-aware all-reduce and broadcast for hosts whose links differ in speed.

Network model (../shared/ANCHORS.md, "Hosts with unequal links"): a star with a non-blocking
switch, host i on a full-duplex link of B_i bytes/s. A ring moves 2(n-1)/n * S bytes through
every link, so it runs at the slowest link's pace for all of them.

All-reduce: a reduce-scatter then an all-gather in which rank i owns a shard of s_i bytes and
every rank talks *directly* to every owner: each rank sends its piece of shard i to owner i,
which combines the n pieces, then sends the finished shard to every other rank. Rank i then
sends (and receives) S - s_i + (n-1) s_i = S + (n-2) s_i bytes, so :func:`aware_weights`
picks s_i to make (S + (n-2) s_i) / B_i equal, giving a very slow rank no shard at all. The
tensor is cut into chunks and the all-gather of chunk c overlaps the reduce-scatter of chunks
c+1, c+2: without that a slow rank's uplink would work only in the first phase and its
downlink only in the second, and the scheme would lose to a ring.

Broadcast, after Blink (Wang et al., MLSys 2020): depth-2 trees, one per non-root rank. The
root scatters piece j of each chunk to rank j and j forwards it to the other non-root ranks,
so no byte is relayed twice and the root's link carries S once.

With no measured topology every rank gets an equal share: still correct, just not tuned.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P, chunk_bounds, weighted_bounds
from .ring import bus_factor

# Chunks: the pipeline fills with the first chunk's reduce-scatter and drains with the last
# one's all-gather, when a slow rank's link works in one direction only, so the time is about
# (1 + 1/chunks) x the bound; every chunk costs 2(n-1) messages. Measured in the lab of links
# 1,1,1 Gbit + 250 Mbit, 16 MiB (docs/benchmarks.md): 2 MiB chunks 680 ms, 1 MiB 636 ms,
# 512 KiB 591 ms, 256 KiB 575 ms (bound 537 ms). So: up to 64 chunks, none below 256 KiB.
MAX_CHUNKS = 64
MIN_CHUNK_BYTES = 256 << 10
WINDOW = 2  # chunks whose reduce-scatter (or scatter) is posted ahead; 3 or 4 were slower
           # (more data queued at a slow link's shaper, more drops)


# --- the plan -------------------------------------------------------------------------------

def aware_weights(rates: list[float]) -> list[float]:
    """Each rank's share of the tensor (fractions summing to 1) for the direct
    reduce-scatter + all-gather on links of ``rates`` bytes/s.

    Solves (S + (n-2) s_i) / B_i = T over an active set A (all ranks to start):
    T = S (n - 2 + |A|) / sum_A B, s_i = (T B_i - S) / (n - 2); ranks with s_i < 0 get 0 and
    the rest are solved again. Dropping a rank lowers T, so a dropped rank never comes back
    and the fastest rank is never dropped. n = 2: shares proportional to the rates.
    """
    n = len(rates)
    if n == 0 or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"rates must be positive and finite, got {list(rates)}")
    if n <= 2:
        total = float(sum(rates))
        return [r / total for r in rates]
    active = set(range(n))
    while True:
        t = (n - 2 + len(active)) / sum(rates[i] for i in active)   # in units of S
        shares = [(t * rates[i] - 1) / (n - 2) if i in active else 0.0 for i in range(n)]
        negative = {i for i in active if shares[i] < 0}
        if not negative:
            break
        active -= negative
    total = sum(shares)  # 1 up to rounding; normalise so callers can rely on it
    return [s / total for s in shares]


def aware_bound(nbytes: float, rates: list[float]) -> float:
    """Seconds the aware all-reduce of ``nbytes`` needs at the least on links of ``rates``
    bytes/s: the busiest link, max_i (S + (n-2) s_i) / B_i, which is >= S / B_i for every i."""
    n = len(rates)
    if n <= 1:
        return 0.0
    shares = aware_weights(rates)
    return max((nbytes + (n - 2) * s * nbytes) / b for s, b in zip(shares, rates))


def aware_broadcast_bound(nbytes: float, rates: list[float]) -> float:
    """Seconds an aware broadcast of ``nbytes`` needs at the least: the root sends S and every
    other rank receives S, so max_i S / B_i whichever rank is the root.

    The relays fit under it: non-root j sends (n-2) s_j with s_j = S B_j / sum_{k != root} B_k,
    i.e. (n-2) S / sum_k B_k seconds of uplink, below S / min_k B_k.
    """
    if len(rates) <= 1:
        return 0.0
    return nbytes / min(rates)


def aware_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages on the critical path, bytes on the wire, bytes reduced) for ``n`` bytes on
    ``p`` ranks with equal links. The 2(p-1) messages of a chunk travel at once, so a chunk
    costs two message latencies (reduce-scatter, all-gather); shares are S/p as for a ring."""
    if p <= 1:
        return 0, 0.0, 0.0
    wire = float(bus_factor(p) * n)
    return 2 * chunk_count(n), wire, wire / 2


def chunk_count(nbytes: float) -> int:
    """How many chunks a tensor of ``nbytes`` is cut into (see MAX_CHUNKS)."""
    return max(1, min(MAX_CHUNKS, math.ceil(nbytes / MIN_CHUNK_BYTES)))


def _chunks(buf: torch.Tensor, chunk_bytes: int | None) -> list[tuple[int, int]]:
    nbytes = buf.numel() * buf.element_size()
    count = (chunk_count(nbytes) if chunk_bytes is None
             else max(1, math.ceil(nbytes / max(1, chunk_bytes))))
    return chunk_bounds(buf.numel(), min(count, buf.numel()))


def _shards(chunk: tuple[int, int], weights: list[float]) -> list[tuple[int, int]]:
    """The pieces of one chunk, as absolute bounds into the buffer."""
    a, b = chunk
    return [(a + s, a + e) for s, e in weighted_bounds(b - a, weights)]


# --- all-reduce -----------------------------------------------------------------------------

def aware_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                     chunk_bytes: int | None = None) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place with shards sized to the links.

    Shares come from :func:`aware_weights` of ``p2p.rates()`` (equal without a topology).
    Rank r owns piece r of every chunk; it combines the n pieces in rank order (its own in its
    place), so the result does not depend on arrival order, and sends the same bytes to all.
    Tags: 2c for chunk c's reduce-scatter, 2c + 1 for its all-gather.
    """
    n, r = p2p.size, p2p.rank
    if n == 1 or buf.numel() == 0:
        return
    rates = p2p.rates()
    weights = aware_weights(rates) if rates is not None else [1.0] * n
    chunks = _chunks(buf, chunk_bytes)
    shards = [_shards(chunk, weights) for chunk in chunks]
    peers = [j for j in range(n) if j != r]
    mine = max(e - s for s, e in (sh[r] for sh in shards))
    # (WINDOW, n-1, mine): the peers' pieces of this rank's shard, one slot per chunk in
    # flight; row k holds peers[k]'s piece, so the memory is (n-1) x shard x WINDOW.
    scratch = torch.empty((min(WINDOW, len(chunks)), n - 1, mine), dtype=buf.dtype)
    posted: dict[int, tuple[list, list]] = {}   # chunk -> (receives, sends) of its RS
    gathers: deque = deque()                      # (chunk, [(handle, peer)]) of posted AGs

    def post_reduce_scatter(c: int) -> None:
        s, e = shards[c][r]
        slot = scratch[c % WINDOW]
        recvs = [(p2p.irecv(slot[k, :e - s], j, 2 * c), j) for k, j in enumerate(peers)]
        sends = [(p2p.isend(buf[slice(*shards[c][j])], j, 2 * c), j) for j in peers]
        posted[c] = (recvs, sends)

    def reduce(c: int) -> None:
        recvs, sends = posted.pop(c)
        for handle, j in recvs:
            p2p.wait(handle, j)
        s, e = shards[c][r]
        slot = scratch[c % WINDOW]
        pieces = [buf[s:e] if j == r else slot[j - (j > r), :e - s] for j in range(n)]
        # Combine in rank order: pieces[0] op pieces[1] op ... ; the sum of floats depends on
        # its order, and this order is the same whichever peer's piece arrived first.
        # Rank 0 accumulates in place; the others in row 0 of the slot, free once read.
        acc = pieces[0]
        for piece in pieces[1:]:
            combine_(acc, piece, op)
        if r != 0:
            buf[s:e].copy_(acc)
        # The pieces sent from this chunk must have left before the all-gather writes there.
        for handle, j in sends:
            p2p.wait(handle, j)

    def post_all_gather(c: int) -> None:
        own = buf[slice(*shards[c][r])]
        handles = [(p2p.irecv(buf[slice(*shards[c][j])], j, 2 * c + 1), j) for j in peers]
        handles += [(p2p.isend(own, j, 2 * c + 1), j) for j in peers]
        gathers.append((c, handles))

    def finish_gathers(upto: int) -> None:
        while gathers and gathers[0][0] <= upto:
            for handle, j in gathers.popleft()[1]:
                p2p.wait(handle, j)

    for c in range(min(WINDOW, len(chunks))):
        post_reduce_scatter(c)
    for c in range(len(chunks)):
        reduce(c)
        # All-gather of c first: gloo sends to one peer in order, so it goes out ahead of the
        # reduce-scatter of c + WINDOW posted next, which reuses c's scratch slot.
        post_all_gather(c)
        if c + WINDOW < len(chunks):
            post_reduce_scatter(c + WINDOW)
        finish_gathers(c - WINDOW)
    finish_gathers(len(chunks))


# --- broadcast ------------------------------------------------------------------------------

def _broadcast_weights(rates: list[float] | None, n: int, root: int) -> list[float]:
    """Piece sizes per rank: proportional to the link for non-root ranks, none for the root
    (it already has everything). See :func:`aware_broadcast_bound` for why that suffices."""
    rates = rates if rates is not None else [1.0] * n
    return [0.0 if i == root else float(rates[i]) for i in range(n)]


def aware_broadcast(buf: torch.Tensor, root: int, p2p: P2P,
                    chunk_bytes: int | None = None) -> None:
    """Copy ``buf`` (1-D, contiguous) of rank ``root`` into ``buf`` on every rank of ``p2p``.

    Per chunk the root sends piece j to non-root rank j (tag 2c), and j forwards it to every
    other non-root rank (tag 2c + 1). A non-root rank posts its receives WINDOW chunks ahead,
    so forwarding chunk c overlaps the root's scatter of chunk c + 1. With two ranks the one
    piece goes straight to the other rank and nothing is forwarded.
    """
    n, r = p2p.size, p2p.rank
    if not 0 <= root < n:
        raise ValueError(f"broadcast root {root} is not a rank of a group of {n}")
    if n == 1 or buf.numel() == 0:
        return
    chunks = _chunks(buf, chunk_bytes)
    weights = _broadcast_weights(p2p.rates(), n, root)
    shards = [_shards(chunk, weights) for chunk in chunks]
    others = [j for j in range(n) if j not in (root, r)]
    pending: deque = deque()   # (chunk, [(handle, peer)]) still to wait for

    def finish(upto: int) -> None:
        while pending and pending[0][0] <= upto:
            for handle, j in pending.popleft()[1]:
                p2p.wait(handle, j)

    if r == root:
        for c in range(len(chunks)):
            pending.append((c, [(p2p.isend(buf[slice(*shards[c][j])], j, 2 * c), j)
                                for j in others]))
            finish(c - WINDOW)
        finish(len(chunks))
        return

    from_root: dict[int, object] = {}
    relayed: dict[int, list] = {}   # chunk -> receives of the other ranks' pieces

    def post(c: int) -> None:
        from_root[c] = p2p.irecv(buf[slice(*shards[c][r])], root, 2 * c)
        relayed[c] = [(p2p.irecv(buf[slice(*shards[c][j])], j, 2 * c + 1), j) for j in others]

    for c in range(min(WINDOW, len(chunks))):
        post(c)
    for c in range(len(chunks)):
        p2p.wait(from_root.pop(c), root)
        piece = buf[slice(*shards[c][r])]
        forwards = [(p2p.isend(piece, j, 2 * c + 1), j) for j in others]
        pending.append((c, relayed.pop(c) + forwards))
        if c + WINDOW < len(chunks):
            post(c + WINDOW)
        finish(c - WINDOW)
    finish(len(chunks))
