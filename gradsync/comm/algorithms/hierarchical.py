"""Hierarchical all-reduce: reduce inside each host before anything crosses a host link.

With h hosts of L ranks each (``../shared/ANCHORS.md``, hierarchical all-reduce):

1. reduce-scatter inside each host (through shared memory, algorithms/shm.py, or a ring
   over the host's L ranks where they do not share /dev/shm): local rank l ends up owning
   the host's partial result of one contiguous piece of S/L bytes;
2. all-reduce of that piece across hosts, among the h ranks with local index l. The L
   all-reduces run at once on disjoint sets of processes, so each host link carries
   L * 2(h-1)/h * S/L = 2(h-1)/h * S, against 2(p-1)/p * S (p = hL) for a flat ring whose
   neighbours sit on one host, and L times that when every neighbour is on another host;
3. all-gather inside each host (shared memory or the ring, as step 1).

Hosts come from the group's :class:`~gradsync.comm.topology.Topology`, read in the view's
positions. Without a topology, or with every host holding one rank, there is nothing to reduce
locally and the whole call is ``inter`` over all ranks; with one host it is ``shm`` (or a
ring) over all.

Hosts with unequal numbers of ranks: L is the smallest host's count. A host's extra ranks
(local index l >= L) first fold their tensor into local rank l mod L and get the finished
result back afterwards, a copy of S each way on the host's own links; the L "core" ranks of
every host then run the uniform scheme above.

Every element is finished on one rank and then only copied: after step 2 the h owners of a
piece hold bitwise-equal bits (the inter-host all-reduce promises that), step 3 and the
unfold copy them, so all ranks of the group agree bitwise.

Tags: each transfer uses tags from 0 on its own pair of processes. Steps 1 and 3 use pairs
inside a host, step 2 pairs across hosts, the fold pairs of an extra and a core rank, so no
two concurrent exchanges share a pair; between one pair, messages of one tag arrive in order,
which is all the sequential phases need.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P, chunk_bounds
from .aware import aware_all_reduce
from .ring import ring_all_reduce, ring_reduce_scatter, ring_shape
from .shm import shm_all_gather, shm_all_reduce, shm_reduce_scatter
from .shm_segment import segment

Inter = Callable[[torch.Tensor, ReduceOp, P2P], None]

# The pipeline's fill (the first chunk's step 1) and drain (the last one's step 3) are the
# intra-host time left over; 8 chunks leave an eighth of it, and 1 MiB chunks keep every
# message large next to its fixed cost.
MAX_CHUNKS = 8
MIN_CHUNK_BYTES = 1 << 20


def host_members(p2p: P2P) -> list[list[int]] | None:
    """The view's positions grouped by host, each host's ascending, hosts ordered by their
    lowest position; None when the group has no topology.

    Members the topology does not list count as hosts of their own (every rank computes the
    same layout from the same topology, which is all correctness needs).
    """
    topology = p2p.group.topology
    if topology is None:
        return None
    position = {g: i for i, g in enumerate(p2p.members)}
    hosts = [sorted(position[r] for r in host.ranks if r in position) for host in topology.hosts]
    hosts = [h for h in hosts if h]
    listed = {m for h in hosts for m in h}
    hosts += [[m] for m in range(p2p.size) if m not in listed]
    return sorted(hosts, key=lambda h: h[0])


def ring_all_gather(buf: torch.Tensor, p2p: P2P) -> None:
    """Complete ``buf`` in place when rank r holds piece (r+1) mod p of :func:`chunk_bounds`
    (what :func:`ring_reduce_scatter` leaves): p - 1 steps around the ring r -> r+1.

    No reduction happens here, so whole pieces travel as one message each.
    """
    n, r = p2p.size, p2p.rank
    if n == 1 or buf.numel() == 0:
        return
    bounds = chunk_bounds(buf.numel(), n)
    for step in range(n - 1):
        (sa, sb), (ra, rb) = bounds[(r + 1 - step) % n], bounds[(r - step) % n]
        p2p.sendrecv(buf[sa:sb], (r + 1) % n, buf[ra:rb], (r - 1) % n)


def shm_usable(view: P2P) -> bool:
    """Whether the view's ranks share /dev/shm, asked once per member tuple: the segment's
    attach answers it the same way on every member, so all of them choose alike."""
    known = view.group.__dict__.setdefault("_shm_usable", {})
    if view.members not in known:
        try:
            segment(view, 1)
            known[view.members] = True
        except ValueError:
            known[view.members] = False
    return known[view.members]


def _uniform(buf: torch.Tensor, op: ReduceOp, p2p: P2P, hosts: list[list[int]],
             inter: Inter) -> None:
    """Steps 1-3 on ``hosts`` (positions in ``p2p``), all of the same length L, pipelined
    over chunks: while chunk c crosses the hosts, the host reduces chunk c+1 and gathers
    chunk c-1.

    Two threads: this one runs the intra-host steps (1, 3) in a fixed order, a second one
    the inter-host step (2) of each chunk as soon as its step 1 is done. They talk over
    disjoint pairs of processes (inside a host / across hosts), and each pair's messages
    keep one thread's order, so tags from 0 per exchange cannot be confused.
    """
    host = next(h for h in hosts if p2p.rank in h)
    local = host.index(p2p.rank)
    intra, across = p2p.view(host), p2p.view([h[local] for h in hosts])
    chunks = chunk_bounds(buf.numel(), chunk_count(buf.numel() * buf.element_size(),
                                                   buf.numel()))
    shared = shm_usable(intra)

    def reduce_scatter(c: int) -> tuple[int, int]:
        # (1) chunk: (k,); afterwards only chunk[lo:hi], (about k / L,), holds this host's
        # partial result, and the bounds are the same on every host because L is.
        a, b = chunks[c]
        if shared:
            return shm_reduce_scatter(buf[a:b], op, intra)
        return ring_reduce_scatter(buf[a:b], op, intra)

    def all_gather(c: int) -> None:
        # (3) each reduce-scatter's ownership is the matching all-gather's starting point.
        a, b = chunks[c]
        if shared:
            shm_all_gather(buf[a:b], chunk_bounds(b - a, len(host)), intra)
        else:
            ring_all_gather(buf[a:b], intra)

    def across_hosts(c: int, lo: int, hi: int) -> None:
        # (2) the same piece on the same local index of every host; a slice of a 1-D
        # contiguous tensor is contiguous, as every algorithm wants.
        a = chunks[c][0]
        inter(buf[a + lo:a + hi], op, across)

    if len(chunks) == 1:
        across_hosts(0, *reduce_scatter(0))
        all_gather(0)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="gradsync-inter") as pool:
        pending = []
        for c in range(len(chunks) + 1):
            if c < len(chunks):
                pending.append(pool.submit(across_hosts, c, *reduce_scatter(c)))
            if c >= 1:
                pending[c - 1].result()
                all_gather(c - 1)


def chunk_count(nbytes: int, numel: int) -> int:
    """Chunks of the pipeline: up to MAX_CHUNKS, none below MIN_CHUNK_BYTES."""
    return max(1, min(MAX_CHUNKS, nbytes // MIN_CHUNK_BYTES, numel))


def _default_inter(p2p: P2P) -> Inter:
    """The all-reduce across hosts: ``aware`` when the host links differ (it reads each
    member's share of its link from the topology), the ring otherwise."""
    topology = p2p.group.topology
    return aware_all_reduce if topology is not None and topology.unequal() else ring_all_reduce


def hierarchical_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P,
                            inter: Inter | None = None) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place, reducing inside hosts first.

    Args:
        buf: (numel,) any dtype; reduced with ``op`` (SUM/MAX/MIN/PRODUCT) across ``p2p``.
        op: the wire op (AVG is finished by the caller).
        p2p: the ranks to reduce over; hosts come from ``p2p.group.topology``.
        inter: ``inter(piece, op, view)``, the all-reduce across hosts (default: ``aware``
            on unequal host links, else the ring); it must leave bitwise-equal results on
            its members.
    """
    inter = inter or _default_inter(p2p)
    if p2p.size == 1 or buf.numel() == 0:
        return
    hosts = host_members(p2p)
    if hosts is None or all(len(h) == 1 for h in hosts):
        inter(buf, op, p2p)  # every rank is a host: the inter-host algorithm is the whole job
        return
    if len(hosts) == 1:  # nothing crosses a host link
        (shm_all_reduce if shm_usable(p2p) else ring_all_reduce)(buf, op, p2p)
        return
    core = min(len(h) for h in hosts)
    host = next(h for h in hosts if p2p.rank in h)
    local = host.index(p2p.rank)
    if local >= core:
        # An extra rank: hand the whole tensor to its core rank, then take the result back.
        partner = host[local % core]
        p2p.send(buf, partner)
        p2p.recv(buf, partner)
        return
    extras = host[core + local::core]  # local indices local + core, local + 2 core, ...
    if extras:
        scratch = torch.empty_like(buf)
        for e in extras:
            p2p.recv(scratch, e)
            combine_(buf, scratch, op)
    _uniform(buf, op, p2p, [h[:core] for h in hosts], inter)
    for e in extras:
        p2p.send(buf, e)


def hierarchical_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages on the critical path, wire bytes, reduced bytes) for ``n`` bytes on ``p``
    ranks. The signature carries no host layout, so these are the flat ring's figures, which
    is also what the call runs without a topology; topology-aware costs are the cost model's."""
    return ring_shape(n, p)
