"""Finding a group's topology on the live cluster, and agreeing on it.

:func:`detect_topology` groups ranks into hosts (one small all-gather of a host key).
:func:`probe_topology` then measures each host's link. In a star network (hosts on one
non-blocking switch) a transfer between hosts i and j runs at min(B_i, B_j), so pairs alone
cannot tell the fastest host's rate. A fan-in can: in round i every other host sends X bytes
to host i at once, and host i's receive rate is min(B_i, sum of the others) -- its own link
whenever the others together can fill it. One representative per host (its lowest rank)
takes part; h hosts cost h rounds, each sized from a first short round to last about
``round_s``. Everything is bounded by ``budget_s``: a probe that would overrun it stops, logs
one warning, and returns the hosts without rates, so the choice of algorithm falls back to
the topology-free one.

:func:`set_topology` attaches a topology to a group after checking that every rank holds the
same one (a digest all-gathered; a per-rank table when they differ, never a hang).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .check import all_gather_rows
from .collectives import broadcast, dist_sum
from .errors import CollectiveMismatchError, translate
from .group import Group, gather_hosts, resolve
from .p2p import P2P
from .topology import HostLink, Topology

log = logging.getLogger(__name__)

FIRST_ROUND_BYTES = 1 << 20         # per sender: 8 ms at 1 Gbit/s, 1 s at 8 Mbit/s
MAX_ROUND_BYTES = 64 << 20          # per sender: 54 ms at 10 Gbit/s
PIECES = 16                         # messages per sender and round: the timing's resolution


def detect_topology(group: Group | None = None) -> Topology:
    """Which ranks share a host (collective; no rates). Hosts are told apart by host name
    and network namespace."""
    group = resolve(group)
    try:
        return gather_hosts(group)
    except RuntimeError as exc:
        raise translate(exc, what="topology detection", rank=group.rank) from exc


def _fan_in(p2p: P2P, reps: list[int], target: int, nbytes: int, tag: int,
            windowed: bool = True) -> float:
    """One round: every representative but ``target`` sends ``nbytes`` to it, as
    ``PIECES`` messages. Returns the target's receive rate in bytes/s (0.0 elsewhere).

    The rate is taken over the window in which every sender is still sending, from the
    first piece to arrive to the moment the first sender is done: after that a slow sender
    alone would set the pace, and the round would measure it instead of the target's link.
    ``windowed=False`` takes the whole round instead: slower, never too fast (socket
    buffers can swallow a short round's first pieces at once), which is what sizing needs.
    """
    me = p2p.rank
    piece = max(1, nbytes // PIECES)
    senders = [r for r in reps if r != target]
    if me != target:
        if me in reps:
            data = torch.zeros(piece, dtype=torch.uint8)
            works = [p2p.isend(data, target, tag) for _ in range(PIECES)]
            for work in works:
                p2p.wait(work, target)
        return 0.0
    bufs = [[torch.empty(piece, dtype=torch.uint8) for _ in range(PIECES)] for _ in senders]
    works = [[p2p.irecv(b, src, tag) for b in row] for src, row in zip(senders, bufs)]

    def arrivals(src: int, row: list) -> list[float]:
        # The engine only notices a receive's completion in wait(): one waiter per sender,
        # each timing its pieces as they land (wait releases the GIL).
        times = []
        for work in row:
            p2p.wait(work, src)
            times.append(time.perf_counter())
        return times

    with ThreadPoolExecutor(len(senders)) as pool:
        per_sender = list(pool.map(arrivals, senders, works))
    start = min(times[0] for times in per_sender)
    first_done = min(times[-1] for times in per_sender)
    counted = sum(t <= first_done for times in per_sender for t in times) - 1
    if not windowed or counted < 2 or first_done <= start:  # the whole round
        end = max(times[-1] for times in per_sender)
        return piece * (PIECES * len(senders) - 1) / max(end - start, 1e-9)
    return piece * counted / (first_done - start)


def _agree(group: Group, value: float, rank: int) -> float:
    """``value`` as computed on ``rank``, everywhere."""
    t = torch.tensor([value], dtype=torch.float64)
    return float(broadcast(t, src=rank, group=group).item())


def probe_topology(group: Group | None = None, budget_s: float = 10.0,
                   round_s: float = 0.15) -> Topology:
    """Measure every host's link (collective): returns a :class:`Topology` with rates in
    bytes/s, or without rates when there is one host or the probe ran out of ``budget_s``.

    It does not attach the result to the group; :func:`set_topology` does.
    """
    group = resolve(group)
    hosts = detect_topology(group)
    if len(hosts.hosts) < 2:
        return hosts
    reps = [h.ranks[0] for h in hosts.hosts]
    p2p = P2P(group, "topology probe")
    began = time.monotonic()
    # A first short fan-in into host 0 sizes the rounds (rank 0 decides; all follow).
    rate0 = _agree(group, _fan_in(p2p, reps, reps[0], FIRST_ROUND_BYTES, 0, windowed=False),
                   reps[0])
    nbytes = int(min(MAX_ROUND_BYTES, max(FIRST_ROUND_BYTES,
                                          rate0 * round_s / (len(reps) - 1))))
    rates: list[float] = []
    for i, target in enumerate(reps):
        # Rank 0 decides whether another round fits in the budget; all ranks follow.
        projected = time.monotonic() - began + round_s * 2
        if dist_sum(int(group.rank == 0 and projected > budget_s), group):
            log.warning("topology probe stopped after %d of %d hosts (budget %.1f s); using "
                        "the topology-free choice of algorithms", i, len(reps), budget_s)
            return hosts
        rates.append(_agree(group, _fan_in(p2p, reps, target, nbytes, 1 + i), target))
    return Topology(tuple(HostLink(h.name, h.ranks, rate)
                          for h, rate in zip(hosts.hosts, rates)))


def set_topology(topology: Topology | None, group: Group | None = None) -> None:
    """Attach ``topology`` to ``group`` for the network-aware algorithms (collective).

    Raises:
        TopologyError: it does not describe the group (the message says what differs).
        CollectiveMismatchError: ranks passed different topologies (per-rank table).
    """
    group = resolve(group)
    if topology is not None:
        topology.validate(group.size)
    digest = 0 if topology is None else topology.fingerprint()
    hosts = 0 if topology is None else len(topology.hosts)
    rows = all_gather_rows(group, torch.tensor([digest, hosts], dtype=torch.int64),
                            "topology agreement")
    if any(row != rows[0] for row in rows):
        table = "\n".join(f"  rank {i}: " + (f"{h} hosts, digest {d:016x}" if h else "none")
                          for i, (d, h) in enumerate(rows))
        raise CollectiveMismatchError(f"ranks disagree on the topology:\n{table}")
    group.topology = topology
    group.auto_choices.clear()
